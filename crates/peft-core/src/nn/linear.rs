use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Initializer, LinearLayout};
use burn::tensor::module::linear;
use burn::tensor::{Device, Tensor};

use crate::adapter::{AdapterState, BaseWeights};
use crate::nn::quantized::{QuantizedBase, placeholder};
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
    /// A quantized frozen base ([`Linear::quantized`]): the base product runs through it and
    /// `weight` is an empty stand-in.
    #[module(skip)]
    pub quantized: Option<QuantizedBase>,
}

impl From<burn::nn::Linear> for Linear {
    fn from(value: burn::nn::Linear) -> Self {
        Self {
            weight: value.weight,
            bias: value.bias,
            adapters: Vec::new(),
            copies: Vec::new(),
            layout: WeightLayout::Linear,
            quantized: None,
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
            quantized: None,
        }
    }

    /// A layer whose frozen weight stays quantized (QLoRA, a GGUF base): `weight` holds no
    /// elements and the base product runs through `weight`'s quantized kernel; adapters attach
    /// and train as on any layer.
    pub fn quantized(weight: QuantizedBase, bias: Option<Tensor<1>>, device: &Device) -> Self {
        let [_, d_output] = weight.dims();
        Self {
            weight: Param::from_tensor(placeholder(d_output, device)),
            bias: bias.map(Param::from_tensor),
            adapters: Vec::new(),
            copies: Vec::new(),
            layout: WeightLayout::Linear,
            quantized: Some(weight),
        }
    }

    /// The base weight `[in, out]` as kernels read it: the dense one, or the quantized one
    /// dequantized when `needed` (else the empty stand-in, which such kernels never read).
    pub(crate) fn base_weight(&self, needed: bool) -> Tensor<2> {
        match &self.quantized {
            Some(q) if needed => q.dequantize(&self.weight.lazy_device()).transpose(),
            _ => self.weight.val(),
        }
    }

    /// `x·W + b` with the layer's own base (dense or quantized).
    pub(crate) fn base_product(&self, x: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<2> {
        match &self.quantized {
            Some(q) => {
                let y = q.matmul(x);
                match bias {
                    Some(b) => y + b.unsqueeze::<2>(),
                    None => y,
                }
            }
            None => base_linear(x, self.weight.val(), bias),
        }
    }

    /// Set how the weight is laid out in Hugging Face files.
    pub fn with_layout(mut self, layout: WeightLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Input and output sizes.
    pub fn dims(&self) -> [usize; 2] {
        match &self.quantized {
            Some(q) => q.dims(),
            // Without initializing a lazy weight (a model built to be loaded).
            None => self.weight.lazy_shape().dims::<2>(),
        }
    }

    /// Make the frozen base `weight` (a quantized matrix of this layer's shape): the dense
    /// weight is dropped for an empty stand-in. The caller checks the shape.
    pub fn set_quantized_base(&mut self, weight: QuantizedBase, device: &Device) {
        let [_, d_output] = weight.dims();
        self.weight = Param::initialized(self.weight.id, placeholder(d_output, device));
        self.quantized = Some(weight);
    }

    /// Make a quantized base dense again (f32 `[in, out]`), as a merged or saved model needs;
    /// `false` when the base was dense already.
    pub fn dequantize_base(&mut self) -> bool {
        let Some(q) = self.quantized.take() else {
            return false;
        };
        let dense = q.dequantize(&self.weight.lazy_device()).transpose();
        self.weight = Param::initialized(self.weight.id, dense);
        true
    }

    /// Applies the layer and every active, unmerged adapter (see
    /// [`AdapterKernel`](crate::AdapterKernel) for the order of the hooks).
    ///
    /// # Shapes
    /// - input: `[..., d_input]`
    /// - output: `[..., d_output]`
    ///
    /// # Panics
    /// In debug builds, if the layer holds adapters (or `modules_to_save` copies) while a
    /// mixed-adapter batch ([`ForwardContext::mixed`],
    /// [`PeftModel::adapter_rows`](crate::PeftModel::adapter_rows)) is in flight on this
    /// thread: `forward` would run the active adapters on every row and silently ignore the
    /// rows' own; the model must call [`forward_in`](Self::forward_in) with the batch's
    /// context. Release builds do not check.
    ///
    /// ```should_panic
    /// # use burn::tensor::{Device, Tensor};
    /// # use peft_core::nn::{ForwardContext, LinearConfig, RowAdapters};
    /// # use peft_core::{AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, Result, TensorSource};
    /// # #[derive(Debug)]
    /// # struct Noop;
    /// # impl AdapterKernel for Noop {
    /// #     fn merge(&self, _: &mut AdapterState, s: MergeInput<'_>, _: MergeDirection) -> Result<BaseWeights> { Ok(s.current) }
    /// #     fn export(&self, _: &AdapterState) -> Vec<(String, burn::tensor::TensorData)> { vec![] }
    /// #     fn import(&self, s: AdapterState, _: &mut dyn TensorSource) -> Result<AdapterState> { Ok(s) }
    /// # }
    /// let device = Device::flex();
    /// let mut layer = LinearConfig::new(4, 4).init(&device);
    /// layer.adapters.push(AdapterState::new("a", vec![], vec![], std::sync::Arc::new(Noop)));
    /// let x = Tensor::<2>::zeros([2, 4], &device);
    /// let ctx = ForwardContext::mixed(RowAdapters::new(&["a", "__base__"], &device));
    /// let right = layer.forward_in(x.clone(), &ctx); // each row its own adapter
    /// let wrong = layer.forward(x); // panics (debug builds): the rows' adapters would be ignored
    /// # assert!(cfg!(debug_assertions));
    /// ```
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        super::guard::refuse_plain_forward("Linear", || {
            !self.adapters.is_empty() || !self.copies.is_empty()
        });
        // Each forward's buffers stay on the heap for the next (see the function).
        peft_ops::heap::keep_freed_memory();
        self.forward_active(input)
    }

    /// [`forward`](Self::forward) with a per-call context: in a mixed batch
    /// ([`ForwardContext::mixed`]) row `i` of the input (its first dimension) runs the adapter
    /// the context names for it, whatever is active; the base GEMM runs once for all rows.
    ///
    /// # Panics
    /// If the context's batch differs from the input's first dimension (the models check it).
    pub fn forward_in<const D: usize>(&self, input: Tensor<D>, ctx: &ForwardContext) -> Tensor<D> {
        // Each forward's buffers stay on the heap for the next (see the function).
        peft_ops::heap::keep_freed_memory();
        super::guard::enter(ctx);
        match ctx.rows() {
            Some(rows) => self.forward_mixed(input, rows),
            None => self.forward_active(input),
        }
    }

    fn forward_active<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        let copy = self.copies.iter().find(|c| c.active);
        // Always one 2-D GEMM over all rows: burn's `linear` on a [b, s, in] input runs b
        // separate [s, in] products, 11-20% slower for MiniLM-sized batches (benches/README.md).
        let [d_input, d_output] = self.dims();
        let mut out_shape = input.dims();
        out_shape[D - 1] = d_output;
        let rows = input.shape().num_elements() / d_input;
        let x = input.reshape([rows, d_input]);
        let live = || self.adapters.iter().filter(|a| a.active && !a.merged);
        let product = |x: Tensor<2>, base: &BaseWeights| match copy {
            Some(_) => base_linear(x, base.weight.clone(), base.bias.clone()),
            None => self.base_product(x, base.bias.clone()),
        };
        // Handles, not copies: kernels see the weights the GEMM used. A quantized base is
        // dequantized only for kernels that read it.
        let base = match copy {
            Some(copy) => BaseWeights {
                weight: copy.weight.val(),
                bias: copy.bias.as_ref().map(|b| b.val()),
            },
            None => BaseWeights {
                weight: self.base_weight(live().any(|a| a.kernel.reads_base_weight())),
                bias: self.bias.as_ref().map(|b| b.val()),
            },
        };
        if live().next().is_none() {
            return product(x, &base).reshape(out_shape);
        }
        let x_base = live().fold(x.clone(), |x, a| a.kernel.transform_input(a, x));
        let mut y = product(x_base, &base);
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
        if peft_ops::few_rows(&x, &weight) {
            // Decoding: a few rows against the whole weight (see `peft_ops::few_rows_matmul`).
            let y = peft_ops::few_rows_matmul(x, weight);
            return match bias {
                Some(b) => y + b.unsqueeze::<2>(),
                None => y,
            };
        }
        return linear(x, weight, bias);
    }
    let dtype = x.dtype();
    let y = x.cast(weight.dtype()).matmul(weight).cast(dtype);
    match bias {
        Some(b) => y + b.cast(dtype).unsqueeze::<2>(),
        None => y,
    }
}
