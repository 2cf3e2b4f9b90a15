//! An adapter-aware 1-D convolution: `burn::nn::conv::Conv1d`'s parameters and forward, plus
//! named adapters (PEFT's `lora.Conv1d`). Adapters see it as a 2-D convolution of height 1
//! (kernel `[out, in / groups, 1, k]`, stride `[1, s]`, ...), so a method's
//! [`forward_conv2d`](crate::AdapterKernel::forward_conv2d) serves both.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::PaddingConfig1d;
use burn::nn::conv::Conv1dConfig as BurnConv1dConfig;
use burn::tensor::module::conv1d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{IndexingUpdateOp, Tensor};

use crate::adapter::{AdapterState, BaseWeights};
use crate::nn::conv::{ConvBase, ConvGeometry, kernel_as_matrix};
use crate::nn::{ForwardContext, RowAdapters};

/// Configuration of an adapter-aware [`Conv1d`]: PyTorch's `nn.Conv1d` arguments (explicit,
/// symmetric padding).
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use peft_core::nn::Conv1dConfig;
///
/// let device = Device::flex();
/// let conv = Conv1dConfig::new(4, 6, 3).with_padding(1).init(&device);
/// assert_eq!(conv.weight.dims(), [6, 4, 3]);
/// assert_eq!(conv.forward(Tensor::<3>::zeros([2, 4, 10], &device)).dims(), [2, 6, 10]);
/// ```
#[derive(Config, Debug)]
pub struct Conv1dConfig {
    /// Input channels.
    pub channels_in: usize,
    /// Output channels.
    pub channels_out: usize,
    /// Kernel size.
    pub kernel_size: usize,
    /// Stride.
    #[config(default = 1)]
    pub stride: usize,
    /// Zero padding on each side.
    #[config(default = 0)]
    pub padding: usize,
    /// Spacing between kernel elements.
    #[config(default = 1)]
    pub dilation: usize,
    /// Channel groups.
    #[config(default = 1)]
    pub groups: usize,
    /// Whether the layer has a bias.
    #[config(default = true)]
    pub bias: bool,
}

impl Conv1dConfig {
    /// Initialize a new [`Conv1d`] with no adapters, as `burn::nn::conv::Conv1dConfig::init`.
    ///
    /// # Panics
    /// If the channels are not divisible by `groups` (Burn's own check).
    pub fn init(&self, device: &burn::tensor::Device) -> Conv1d {
        let inner = BurnConv1dConfig::new(self.channels_in, self.channels_out, self.kernel_size)
            .with_stride(self.stride)
            .with_dilation(self.dilation)
            .with_groups(self.groups)
            .with_bias(self.bias)
            .with_padding(PaddingConfig1d::Explicit(self.padding, self.padding))
            .init(device);
        Conv1d {
            weight: inner.weight,
            bias: inner.bias,
            adapters: Vec::new(),
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
        }
    }
}

/// A 1-D convolution (weight `[out, in / groups, k]`, PyTorch's layout and names) that can carry
/// named adapters. With no active adapter the output is that of Burn's layer.
#[derive(Module, Debug)]
pub struct Conv1d {
    /// The kernel `[out, in / groups, k]`.
    pub weight: Param<Tensor<3>>,
    /// The bias `[out]`.
    pub bias: Option<Param<Tensor<1>>>,
    /// Named adapters attached to this layer.
    pub adapters: Vec<AdapterState>,
    /// Stride.
    #[module(skip)]
    pub stride: usize,
    /// Zero padding on each side.
    #[module(skip)]
    pub padding: usize,
    /// Spacing between kernel elements.
    #[module(skip)]
    pub dilation: usize,
    /// Channel groups.
    #[module(skip)]
    pub groups: usize,
}

impl Conv1d {
    /// The kernel's dims `[out, in / groups, k]` (without initializing a lazy weight).
    pub fn dims(&self) -> [usize; 3] {
        self.weight.lazy_shape().dims::<3>()
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.dims()[1] * self.groups
    }

    /// The geometry of the layer seen as a 2-D convolution of height 1.
    pub fn geometry(&self) -> ConvGeometry {
        ConvGeometry {
            stride: [1, self.stride],
            padding: [0, self.padding],
            dilation: [1, self.dilation],
            groups: self.groups,
        }
    }

    /// The base as kernels see it: a 2-D convolution of height 1.
    pub fn base(&self) -> ConvBase {
        ConvBase {
            weight: self.weight.val().unsqueeze_dim(2),
            bias: self.bias.as_ref().map(|b| b.val()),
            geometry: self.geometry(),
        }
    }

    /// The kernel and bias as the `[in/g·k, out]` matrix merges work on.
    pub(crate) fn base_matrix(&self) -> BaseWeights {
        BaseWeights {
            weight: kernel_as_matrix(self.weight.val().unsqueeze_dim(2)),
            bias: self.bias.as_ref().map(|b| b.val()),
        }
    }

    fn base_conv(&self, input: Tensor<3>) -> Tensor<3> {
        let options = ConvOptions::new([self.stride], [self.padding], [self.dilation], self.groups);
        conv1d(
            input,
            self.weight.val(),
            self.bias.as_ref().map(|b| b.val()),
            options,
        )
    }

    /// Applies the convolution and every active, unmerged adapter.
    ///
    /// # Shapes
    /// - input: `[batch, in, length]`
    /// - output: `[batch, out, length']`
    ///
    /// # Panics
    /// In debug builds, if the layer holds adapters while a mixed-adapter batch is in flight on
    /// this thread (see [`Linear::forward`](crate::nn::Linear::forward)): use
    /// [`forward_in`](Self::forward_in).
    pub fn forward(&self, input: Tensor<3>) -> Tensor<3> {
        super::guard::refuse_plain_forward("Conv1d", || !self.adapters.is_empty());
        self.forward_active(input)
    }

    /// [`forward`](Self::forward) with a per-call context (mixed-adapter batches).
    ///
    /// # Panics
    /// If the context's batch differs from the input's first dimension (the models check it).
    pub fn forward_in(&self, input: Tensor<3>, ctx: &ForwardContext) -> Tensor<3> {
        super::guard::enter(ctx);
        match ctx.rows() {
            Some(rows) => self.forward_mixed(input, rows),
            None => self.forward_active(input),
        }
    }

    fn forward_active(&self, input: Tensor<3>) -> Tensor<3> {
        let y = self.base_conv(input.clone());
        let mut live = self
            .adapters
            .iter()
            .filter(|a| a.active && !a.merged)
            .peekable();
        if live.peek().is_none() {
            return y;
        }
        let base = self.base();
        let x = input.unsqueeze_dim::<4>(2);
        let mut y = y.unsqueeze_dim::<4>(2);
        for adapter in live {
            y = adapter.kernel.forward_conv2d(adapter, &base, x.clone(), y);
        }
        y.squeeze_dim(2)
    }

    fn forward_mixed(&self, input: Tensor<3>, rows: &RowAdapters) -> Tensor<3> {
        let batch = input.dims()[0];
        assert_eq!(
            batch,
            rows.batch(),
            "a mixed batch names one adapter per row of dimension 0"
        );
        let base = self.base();
        let mut y = self.base_conv(input.clone());
        let x = input.unsqueeze_dim::<4>(2);
        for (name, group) in rows.adapter_groups() {
            let Some(adapter) = self.adapters.iter().find(|a| a.name == name && !a.merged) else {
                continue;
            };
            let xg = x.clone().select(0, group.index.clone());
            let yg = y
                .clone()
                .select(0, group.index.clone())
                .unsqueeze_dim::<4>(2);
            let changed = adapter
                .kernel
                .forward_conv2d(adapter, &base, xg, yg.clone());
            let delta: Tensor<3> = (changed - yg).squeeze_dim(2);
            y = y.select_assign(0, group.index.clone(), delta, IndexingUpdateOp::Add);
        }
        y
    }
}
