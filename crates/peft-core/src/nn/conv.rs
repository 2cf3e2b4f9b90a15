//! An adapter-aware 2-D convolution: `burn::nn::conv::Conv2d`'s parameters and forward, plus
//! named adapters (LoRA and DoRA on convolutions, as PEFT's `lora.Conv2d`).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig as BurnConv2dConfig;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{IndexingUpdateOp, Tensor};

use crate::adapter::{AdapterState, BaseWeights};
use crate::error::{PeftError, Result};
use crate::nn::{ForwardContext, RowAdapters};

/// Configuration of an adapter-aware [`Conv2d`]: PyTorch's `nn.Conv2d` arguments (explicit,
/// symmetric padding).
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use peft_core::nn::Conv2dConfig;
///
/// let device = Device::flex();
/// let conv = Conv2dConfig::new([3, 8], [3, 3]).with_stride([2, 2]).with_padding([1, 1]).init(&device);
/// assert_eq!(conv.weight.dims(), [8, 3, 3, 3]);
/// let y = conv.forward(Tensor::<4>::zeros([1, 3, 9, 9], &device));
/// assert_eq!(y.dims(), [1, 8, 5, 5]);
/// ```
#[derive(Config, Debug)]
pub struct Conv2dConfig {
    /// Input and output channels.
    pub channels: [usize; 2],
    /// Kernel height and width.
    pub kernel_size: [usize; 2],
    /// Stride.
    #[config(default = "[1, 1]")]
    pub stride: [usize; 2],
    /// Zero padding on each side (top = bottom, left = right).
    #[config(default = "[0, 0]")]
    pub padding: [usize; 2],
    /// Spacing between kernel elements.
    #[config(default = "[1, 1]")]
    pub dilation: [usize; 2],
    /// Channel groups (`in` and `out` divisible by it; `in` for a depthwise convolution).
    #[config(default = 1)]
    pub groups: usize,
    /// Whether the layer has a bias.
    #[config(default = true)]
    pub bias: bool,
}

impl Conv2dConfig {
    /// Initialize a new [`Conv2d`] with no adapters, as `burn::nn::conv::Conv2dConfig::init`.
    ///
    /// # Panics
    /// If the channels are not divisible by `groups` (Burn's own check).
    pub fn init(&self, device: &burn::tensor::Device) -> Conv2d {
        let [p0, p1] = self.padding;
        let inner = BurnConv2dConfig::new(self.channels, self.kernel_size)
            .with_stride(self.stride)
            .with_dilation(self.dilation)
            .with_groups(self.groups)
            .with_bias(self.bias)
            .with_padding(PaddingConfig2d::Explicit(p0, p1, p0, p1))
            .init(device);
        Conv2d {
            weight: inner.weight,
            bias: inner.bias,
            adapters: Vec::new(),
            geometry: ConvGeometry {
                stride: self.stride,
                padding: self.padding,
                dilation: self.dilation,
                groups: self.groups,
            },
        }
    }
}

/// How a convolution slides: what kernels need beyond its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Stride.
    pub stride: [usize; 2],
    /// Zero padding on each side.
    pub padding: [usize; 2],
    /// Spacing between kernel elements.
    pub dilation: [usize; 2],
    /// Channel groups.
    pub groups: usize,
}

impl ConvGeometry {
    /// Burn's options for this geometry.
    pub fn options(&self) -> ConvOptions<2> {
        ConvOptions::new(self.stride, self.padding, self.dilation, self.groups)
    }
}

/// The base of a convolution site as its kernels see it: the weight
/// `[out, in / groups, kh, kw]` (PyTorch's layout), the bias and the geometry.
#[derive(Debug, Clone)]
pub struct ConvBase {
    /// The kernel.
    pub weight: Tensor<4>,
    /// The bias, if the layer has one.
    pub bias: Option<Tensor<1>>,
    /// Stride, padding, dilation, groups.
    pub geometry: ConvGeometry,
}

impl ConvBase {
    /// The base convolution of `x` without the bias (DoRA rescales that part alone).
    pub fn conv_without_bias(&self, x: Tensor<4>) -> Tensor<4> {
        conv2d(x, self.weight.clone(), None, self.geometry.options())
    }
}

/// The kernel `[out, in/g, kh, kw]` as the `[in/g·kh·kw, out]` matrix kernels merge into
/// (Burn's linear layout: each output channel is a column). LoRA's `A·B` and DoRA's column
/// norms then read as at a linear site (PEFT's conv delta is `B·A` reshaped, its weight norm
/// the norm over every dimension but the output channel).
pub fn kernel_as_matrix(weight: Tensor<4>) -> Tensor<2> {
    let [out, per_group, kh, kw] = weight.dims();
    weight.reshape([out, per_group * kh * kw]).transpose()
}

/// The inverse of [`kernel_as_matrix`] for a kernel of `dims`.
pub fn matrix_as_kernel(matrix: Tensor<2>, dims: [usize; 4]) -> Tensor<4> {
    matrix.transpose().reshape(dims)
}

/// A 2-D convolution (`burn::nn::conv::Conv2d`'s weight `[out, in / groups, kh, kw]` and bias,
/// PyTorch's layout and names) that can carry named adapters. With no active adapter the
/// output is that of Burn's layer, bit for bit.
#[derive(Module, Debug)]
pub struct Conv2d {
    /// The kernel `[out, in / groups, kh, kw]`.
    pub weight: Param<Tensor<4>>,
    /// The bias `[out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// Named adapters attached to this layer.
    pub adapters: Vec<AdapterState>,
    /// Stride, padding, dilation, groups.
    #[module(skip)]
    pub geometry: ConvGeometry,
}

impl TryFrom<burn::nn::conv::Conv2d> for Conv2d {
    type Error = PeftError;

    /// Burn's layer with its weights; refused for padding PyTorch's `nn.Conv2d` has no
    /// equivalent of (asymmetric, or `Same`, which depends on the input size).
    fn try_from(conv: burn::nn::conv::Conv2d) -> Result<Self> {
        let padding = match conv.padding {
            PaddingConfig2d::Valid => [0, 0],
            PaddingConfig2d::Explicit(top, left, bottom, right)
                if top == bottom && left == right =>
            {
                [top, left]
            }
            other => {
                return Err(PeftError::InvalidConfig {
                    file: None,
                    key: "padding".into(),
                    reason: format!(
                        "a convolution with padding {other:?} cannot become an adapter-aware \
                         Conv2d: only explicit symmetric padding (PyTorch's `padding=(h, w)`) is \
                         supported"
                    ),
                });
            }
        };
        Ok(Self {
            weight: conv.weight,
            bias: conv.bias,
            adapters: Vec::new(),
            geometry: ConvGeometry {
                stride: conv.stride,
                padding,
                dilation: conv.dilation,
                groups: conv.groups,
            },
        })
    }
}

impl Conv2d {
    /// The kernel's dims `[out, in / groups, kh, kw]` (without initializing a lazy weight).
    pub fn dims(&self) -> [usize; 4] {
        self.weight.lazy_shape().dims::<4>()
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.dims()[1] * self.geometry.groups
    }

    /// The base as kernels see it.
    pub fn base(&self) -> ConvBase {
        ConvBase {
            weight: self.weight.val(),
            bias: self.bias.as_ref().map(|b| b.val()),
            geometry: self.geometry,
        }
    }

    /// The kernel and bias as the `[in/g·kh·kw, out]` matrix merges work on.
    pub(crate) fn base_matrix(&self) -> BaseWeights {
        BaseWeights {
            weight: kernel_as_matrix(self.weight.val()),
            bias: self.bias.as_ref().map(|b| b.val()),
        }
    }

    /// Applies the convolution and every active, unmerged adapter.
    ///
    /// # Shapes
    /// - input: `[batch, in, h, w]`
    /// - output: `[batch, out, h', w']`
    ///
    /// # Panics
    /// In debug builds, if the layer holds adapters while a mixed-adapter batch is in flight on
    /// this thread (see [`Linear::forward`](crate::nn::Linear::forward)): use
    /// [`forward_in`](Self::forward_in).
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        super::guard::refuse_plain_forward("Conv2d", || !self.adapters.is_empty());
        self.forward_active(input)
    }

    /// [`forward`](Self::forward) with a per-call context: in a mixed batch
    /// ([`ForwardContext::mixed`]) image `i` runs the adapter the context names for it; the base
    /// convolution runs once for the whole batch.
    ///
    /// # Panics
    /// If the context's batch differs from the input's first dimension (the models check it).
    pub fn forward_in(&self, input: Tensor<4>, ctx: &ForwardContext) -> Tensor<4> {
        super::guard::enter(ctx);
        match ctx.rows() {
            Some(rows) => self.forward_mixed(input, rows),
            None => self.forward_active(input),
        }
    }

    fn live(&self) -> impl Iterator<Item = &AdapterState> {
        self.adapters.iter().filter(|a| a.active && !a.merged)
    }

    fn forward_active(&self, input: Tensor<4>) -> Tensor<4> {
        let base = self.base();
        let mut y = conv2d(
            input.clone(),
            base.weight.clone(),
            base.bias.clone(),
            base.geometry.options(),
        );
        for adapter in self.live() {
            y = adapter
                .kernel
                .forward_conv2d(adapter, &base, input.clone(), y);
        }
        y
    }

    /// PEFT's `_mixed_batch_forward` for a convolution: the base once, then each adapter on its
    /// images, its change added back (see `nn::mixed`).
    fn forward_mixed(&self, input: Tensor<4>, rows: &RowAdapters) -> Tensor<4> {
        let batch = input.dims()[0];
        assert_eq!(
            batch,
            rows.batch(),
            "a mixed batch names one adapter per row of dimension 0"
        );
        let base = self.base();
        let mut y = conv2d(
            input.clone(),
            base.weight.clone(),
            base.bias.clone(),
            base.geometry.options(),
        );
        for (name, group) in rows.adapter_groups() {
            let Some(adapter) = self.adapters.iter().find(|a| a.name == name && !a.merged) else {
                continue;
            };
            let xg = input.clone().select(0, group.index.clone());
            let yg = y.clone().select(0, group.index.clone());
            let changed = adapter
                .kernel
                .forward_conv2d(adapter, &base, xg, yg.clone());
            y = y.select_assign(0, group.index.clone(), changed - yg, IndexingUpdateOp::Add);
        }
        y
    }
}

/// A convolution's kernel as the site plumbing (merge, training, loading) handles it: seen as
/// the matrix [`kernel_as_matrix`] gives, whatever the convolution's rank.
pub(crate) enum KernelSlot<'a> {
    /// A 1-D kernel `[out, in / groups, k]`.
    D1(&'a mut Param<Tensor<3>>),
    /// A 2-D kernel `[out, in / groups, kh, kw]`.
    D2(&'a mut Param<Tensor<4>>),
}

impl KernelSlot<'_> {
    /// The kernel as the `[in/g·k…, out]` matrix.
    pub(crate) fn matrix(&self) -> Tensor<2> {
        match self {
            KernelSlot::D1(w) => kernel_as_matrix(w.val().unsqueeze_dim(2)),
            KernelSlot::D2(w) => kernel_as_matrix(w.val()),
        }
    }

    /// Replace the kernel's value by `matrix` (detached), keeping the parameter's id.
    pub(crate) fn set_matrix(&mut self, matrix: Tensor<2>) {
        let matrix = matrix.detach();
        match self {
            KernelSlot::D1(w) => {
                let [out, per_group, k] = w.dims();
                **w = w
                    .clone()
                    .map(|_| matrix_as_kernel(matrix, [out, per_group, 1, k]).squeeze_dim(2));
            }
            KernelSlot::D2(w) => {
                let dims = w.dims();
                **w = w.clone().map(|_| matrix_as_kernel(matrix, dims));
            }
        }
    }

    /// The device of the kernel.
    pub(crate) fn lazy_device(&self) -> burn::tensor::Device {
        match self {
            KernelSlot::D1(w) => w.lazy_device(),
            KernelSlot::D2(w) => w.lazy_device(),
        }
    }

    /// Make the kernel train, recording its id.
    pub(crate) fn train(&mut self, ids: &mut std::collections::HashSet<burn::module::ParamId>) {
        match self {
            KernelSlot::D1(w) => {
                **w = w.clone().set_require_grad(true);
                ids.insert(w.id);
            }
            KernelSlot::D2(w) => {
                **w = w.clone().set_require_grad(true);
                ids.insert(w.id);
            }
        }
    }
}
