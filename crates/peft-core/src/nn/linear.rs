use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Initializer, LinearLayout};
use burn::tensor::module::linear;
use burn::tensor::{Device, Tensor};

use crate::adapter::{AdapterState, BaseWeights};
use crate::nn::{ForwardContext, ModuleCopy};

/// How a Hugging Face checkpoint stores this layer's weight; used at the file boundary only
/// (Burn always keeps `[in, out]` in memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightLayout {
    /// `torch.nn.Linear`: `[out, in]` in the file.
    #[default]
    Linear,
    /// GPT-2's `Conv1D`: `[in, out]` in the file (PEFT's `fan_in_fan_out = true`).
    Conv1D,
}

/// Configuration of an adapter-aware [`Linear`]; the same fields and builder as
/// `burn::nn::LinearConfig`.
///
/// ```
/// use burn::tensor::Device;
/// use peft_core::nn::LinearConfig;
///
/// let device = Device::flex();
/// let layer = LinearConfig::new(8, 4).with_bias(false).init(&device);
/// assert_eq!(layer.weight.dims(), [8, 4]);
/// ```
#[derive(Config, Debug)]
pub struct LinearConfig {
    /// The size of the input features.
    pub d_input: usize,
    /// The size of the output features.
    pub d_output: usize,
    /// If a bias should be applied during the linear transformation.
    #[config(default = true)]
    pub bias: bool,
    /// The type of function used to initialize neural network parameters.
    #[config(
        default = "Initializer::KaimingUniform{gain:1.0/num_traits::Float::sqrt(3.0), fan_out_only:false}"
    )]
    pub initializer: Initializer,
}

impl LinearConfig {
    /// Initialize a new [`Linear`] with no adapters; numerically identical to
    /// `burn::nn::LinearConfig::init`.
    pub fn init(&self, device: &Device) -> Linear {
        let inner = burn::nn::LinearConfig::new(self.d_input, self.d_output)
            .with_bias(self.bias)
            .with_initializer(self.initializer.clone())
            .with_layout(LinearLayout::Row)
            .init(device);
        Linear::from(inner)
    }
}

/// A linear layer (`y = x W + b`, `W` is `[in, out]`) that can carry named adapters.
///
/// Parameter names (`weight`, `bias`), configuration and forward are those of
/// `burn::nn::Linear`; with no active adapter the output is bit-identical.
#[derive(Module, Debug)]
pub struct Linear {
    /// Matrix of shape `[d_input, d_output]`.
    pub weight: Param<Tensor<2>>,
    /// Vector of size `d_output`.
    pub bias: Option<Param<Tensor<1>>>,
    /// Named adapters attached to this layer.
    pub adapters: Vec<AdapterState>,
    /// Trainable copies for `modules_to_save`.
    pub copies: Vec<ModuleCopy>,
    /// The layout of the weight in Hugging Face files.
    #[module(skip)]
    pub layout: WeightLayout,
}

impl From<burn::nn::Linear> for Linear {
    fn from(value: burn::nn::Linear) -> Self {
        Self {
            weight: value.weight,
            bias: value.bias,
            adapters: Vec::new(),
            copies: Vec::new(),
            layout: WeightLayout::Linear,
        }
    }
}

impl Linear {
    /// A layer from a weight `[in, out]` and an optional bias `[out]`.
    pub fn from_tensors(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
            adapters: Vec::new(),
            copies: Vec::new(),
            layout: WeightLayout::Linear,
        }
    }

    /// Set how the weight is laid out in Hugging Face files.
    pub fn with_layout(mut self, layout: WeightLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Input and output sizes.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.dims()
    }

    /// Applies the layer and every active, unmerged adapter (see
    /// [`AdapterKernel`](crate::AdapterKernel) for the order of the hooks).
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        self.forward_active(input)
    }

    /// [`forward`](Self::forward) with a per-call context: in a mixed batch
    /// ([`ForwardContext::mixed`]) row `i` of the input (its first dimension) runs the adapter
    /// the context names for it, whatever is active; the base GEMM runs once for all rows.
    ///
    /// # Panics
    /// If the context's batch differs from the input's first dimension (the models check it).
    pub fn forward_in<const D: usize>(&self, input: Tensor<D>, ctx: &ForwardContext) -> Tensor<D> {
        match ctx.rows() {
            Some(rows) => self.forward_mixed(input, rows),
            None => self.forward_active(input),
        }
    }

    fn forward_active<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let (weight, bias) = match self.copies.iter().find(|c| c.active) {
            Some(copy) => (copy.weight.val(), copy.bias.as_ref().map(|b| b.val())),
            None => (self.weight.val(), self.bias.as_ref().map(|b| b.val())),
        };
        // Always one 2-D GEMM over all rows: burn's `linear` on a [b, s, in] input runs b
        // separate [s, in] products, 11-20% slower for MiniLM-sized batches (benches/README.md).
        let [d_input, d_output] = weight.dims();
        let mut out_shape = input.dims();
        out_shape[D - 1] = d_output;
        let rows = input.shape().num_elements() / d_input;
        let x = input.reshape([rows, d_input]);
        let live = || self.adapters.iter().filter(|a| a.active && !a.merged);
        if live().next().is_none() {
            return base_linear(x, weight, bias).reshape(out_shape);
        }
        // Handles, not copies: kernels see the weights the GEMM used.
        let base = BaseWeights { weight, bias };
        let x_base = live().fold(x.clone(), |x, a| a.kernel.transform_input(a, x));
        let mut y = base_linear(x_base, base.weight.clone(), base.bias.clone());
        for adapter in live() {
            y = adapter.kernel.forward_linear(adapter, &base, x.clone(), y);
        }
        y.reshape(out_shape)
    }
}

/// The base product `x·W + b` of a site. With a half-precision frozen base
/// (`precision::cast_frozen_base`) the product runs in the weight's precision and the output (and
/// everything after it) in the input's, as under PyTorch's autocast; the bias stays in f32.
pub(crate) fn base_linear(x: Tensor<2>, weight: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<2> {
    if weight.dtype() == x.dtype() {
        return linear(x, weight, bias);
    }
    let dtype = x.dtype();
    let y = x.cast(weight.dtype()).matmul(weight).cast(dtype);
    match bias {
        Some(b) => y + b.cast(dtype).unsqueeze::<2>(),
        None => y,
    }
}
