//! ResNet (transformers' `ResNetModel` / `ResNetForImageClassification`, e.g.
//! microsoft/resnet-50): a 7x7 stem and max pool, stages of basic or bottleneck residual layers,
//! a global average pool, and a linear classifier.
//!
//! Every convolution and the classifier are adapter-aware layers under their Hugging Face names
//! (`embedder.embedder.convolution`, `encoder.stages.N.layers.M.layer.K.convolution`,
//! `...shortcut.convolution`, `classifier.1`), so LoRA / DoRA `target_modules` apply unchanged
//! and mixed-adapter batches run a different adapter per image.
//!
//! Normalization is `burn::nn::BatchNorm` with the checkpoint's running statistics: on a device
//! without autodiff the model computes what PyTorch's eval mode does. On an autodiff device
//! (training) Burn's BatchNorm uses the batch's statistics instead and updates its running
//! ones, as PyTorch's train mode does (adapters freeze the base's parameters, not BatchNorm's
//! training flag, just as PEFT leaves `model.train()` alone); run inference on `.valid()` (or
//! a device without autodiff), or `Module::freeze` the BatchNorm layers to keep their
//! statistics while training.
//!
//! ResNet has no attention: prefix tuning and other prompt methods are refused when added.

mod arch;
mod config;
mod names;

pub use arch::{ARCHITECTURE, ResNet};
pub use config::ResNetConfig;

use burn::module::Module;
use burn::nn::{BatchNorm, BatchNormConfig};
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::MaxPoolOptions;
use burn::tensor::{Device, Tensor};
use peft_core::Adaptable;
use peft_core::nn::{Conv2d, Conv2dConfig, ForwardContext, KvPrefix, Linear, LinearConfig};

use crate::error::Result;
use crate::input_checks;
use crate::ops::Activation;
use config::BOTTLENECK_REDUCTION;

/// `ResNetConvLayer`: convolution (no bias, padding `kernel / 2`), BatchNorm, activation.
#[derive(Module, Debug, Adaptable)]
pub struct ResNetConvLayer {
    /// The convolution.
    pub convolution: Conv2d,
    /// `nn.BatchNorm2d`: running statistics off autodiff, batch statistics on an autodiff
    /// device unless frozen (PyTorch's eval and train modes).
    pub normalization: BatchNorm,
    /// The activation (`None` for the last convolution of a residual layer).
    #[module(skip)]
    pub activation: Option<Activation>,
}

impl ResNetConvLayer {
    fn new(
        [i, o]: [usize; 2],
        kernel: usize,
        stride: usize,
        activation: Option<Activation>,
        device: &Device,
    ) -> Self {
        Self {
            convolution: Conv2dConfig::new([i, o], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding([kernel / 2, kernel / 2])
                .with_bias(false)
                .init(device),
            normalization: batch_norm(o, device),
            activation,
        }
    }

    fn forward(&self, x: Tensor<4>, fc: &ForwardContext) -> Tensor<4> {
        let y = self
            .normalization
            .forward(self.convolution.forward_in(x, fc));
        match self.activation {
            Some(act) => act.apply(y),
            None => y,
        }
    }
}

/// PyTorch's `nn.BatchNorm2d` defaults (epsilon 1e-5, momentum 0.1).
fn batch_norm(channels: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels)
        .with_epsilon(1e-5)
        .with_momentum(0.1)
        .init(device)
}

/// `ResNetShortCut`: a strided 1x1 projection and BatchNorm.
#[derive(Module, Debug, Adaptable)]
pub struct ResNetShortCut {
    /// The 1x1 convolution.
    pub convolution: Conv2d,
    /// `nn.BatchNorm2d`.
    pub normalization: BatchNorm,
}

/// `ResNetEmbeddings`: the stem (`embedder`) then a 3x3 max pool of stride 2.
#[derive(Module, Debug, Adaptable)]
pub struct ResNetEmbeddings {
    /// The 7x7, stride-2 convolution layer.
    pub embedder: ResNetConvLayer,
}

/// A residual layer (`ResNetBasicLayer` or `ResNetBottleNeckLayer`):
/// `act(layer(x) + shortcut(x))`.
#[derive(Module, Debug, Adaptable)]
pub struct ResNetLayer {
    /// The projection, when channels or stride change (else the identity).
    pub shortcut: Option<ResNetShortCut>,
    /// The convolutions (two 3x3, or 1x1 / 3x3 / 1x1).
    pub layer: Vec<ResNetConvLayer>,
    /// `hidden_act`, after the sum.
    #[module(skip)]
    pub activation: Activation,
}

impl ResNetLayer {
    fn new(c: &ResNetConfig, [i, o]: [usize; 2], stride: usize, device: &Device) -> Self {
        // transformers' inner layers use relu whatever `hidden_act` says.
        let relu = Some(Activation::Relu);
        let layer = if c.bottleneck() {
            let r = o / BOTTLENECK_REDUCTION;
            let (first, middle) = if c.downsample_in_bottleneck {
                (stride, 1)
            } else {
                (1, stride)
            };
            vec![
                ResNetConvLayer::new([i, r], 1, first, relu, device),
                ResNetConvLayer::new([r, r], 3, middle, relu, device),
                ResNetConvLayer::new([r, o], 1, 1, None, device),
            ]
        } else {
            vec![
                ResNetConvLayer::new([i, o], 3, stride, relu, device),
                ResNetConvLayer::new([o, o], 3, 1, None, device),
            ]
        };
        let shortcut = (i != o || stride != 1).then(|| ResNetShortCut {
            convolution: Conv2dConfig::new([i, o], [1, 1])
                .with_stride([stride, stride])
                .with_bias(false)
                .init(device),
            normalization: batch_norm(o, device),
        });
        Self {
            shortcut,
            layer,
            // Checked when the config was read.
            activation: Activation::from_hf(&c.hidden_act).unwrap_or(Activation::Relu),
        }
    }

    fn forward(&self, x: Tensor<4>, fc: &ForwardContext) -> Tensor<4> {
        let residual = match &self.shortcut {
            Some(s) => s
                .normalization
                .forward(s.convolution.forward_in(x.clone(), fc)),
            None => x.clone(),
        };
        let h = self.layer.iter().fold(x, |h, l| l.forward(h, fc));
        self.activation.apply(h + residual)
    }
}

/// `ResNetStage`.
#[derive(Module, Debug, Adaptable)]
pub struct ResNetStage {
    /// Residual layers; the first one changes channels and stride.
    pub layers: Vec<ResNetLayer>,
}

/// `ResNetEncoder`.
#[derive(Module, Debug, Adaptable)]
pub struct ResNetEncoder {
    /// Stages.
    pub stages: Vec<ResNetStage>,
}

/// `ResNetModel`: stem, stages, global average pool.
#[derive(Module, Debug, Adaptable)]
pub struct ResNetModel {
    /// Stem and max pool.
    pub embedder: ResNetEmbeddings,
    /// Stages.
    pub encoder: ResNetEncoder,
    /// An empty key/value prefix site that is not part of the adapter tree: ResNet has no
    /// attention, so prefix tuning finds no site and is refused
    /// ([`PeftError::UnsupportedSite`](peft_core::PeftError::UnsupportedSite)).
    #[module(skip)]
    #[peft(skip)]
    pub(crate) prompt_encoder: KvPrefix,
    /// Input channels (`num_channels`).
    #[module(skip)]
    num_channels: usize,
}

/// What a ResNet forward returns.
#[derive(Debug, Clone)]
pub struct ResNetOutput {
    /// The last stage's features `[b, C, h, w]`.
    pub last_hidden_state: Tensor<4>,
    /// Their global average `[b, C]` (transformers' `pooler_output` `[b, C, 1, 1]`, flattened).
    pub pooler_output: Tensor<2>,
}

impl ResNetModel {
    /// An uninitialized (lazy) model of this shape.
    pub fn new(c: &ResNetConfig, device: &Device) -> Self {
        let act = Activation::from_hf(&c.hidden_act).unwrap_or(Activation::Relu);
        let mut stages = Vec::with_capacity(c.hidden_sizes.len());
        let mut inputs = c.embedding_size;
        for (s, (&out, &depth)) in c.hidden_sizes.iter().zip(&c.depths).enumerate() {
            let stride = if s > 0 || c.downsample_in_first_stage {
                2
            } else {
                1
            };
            let layers = (0..depth)
                .map(|l| {
                    let (i, stride) = if l == 0 { (inputs, stride) } else { (out, 1) };
                    ResNetLayer::new(c, [i, out], stride, device)
                })
                .collect();
            stages.push(ResNetStage { layers });
            inputs = out;
        }
        Self {
            embedder: ResNetEmbeddings {
                embedder: ResNetConvLayer::new(
                    [c.num_channels, c.embedding_size],
                    7,
                    2,
                    Some(act),
                    device,
                ),
            },
            encoder: ResNetEncoder { stages },
            prompt_encoder: KvPrefix::new(0, 1, 1, 1, c.embedding_size),
            num_channels: c.num_channels,
        }
    }

    /// Residual layers over all stages.
    pub fn num_layers(&self) -> usize {
        self.encoder.stages.iter().map(|s| s.layers.len()).sum()
    }

    /// Channels of the pooled features (the last stage's).
    pub fn hidden_size(&self) -> usize {
        let last = self.encoder.stages.last().and_then(|s| s.layers.last());
        last.and_then(|l| l.layer.last())
            .map_or(0, |l| l.convolution.dims()[0])
    }

    /// Encode `pixel_values` `[b, num_channels, h, w]`. Missing or empty images and a wrong
    /// channel count are [`ModelError::InputOutOfRange`](crate::ModelError::InputOutOfRange).
    pub fn forward(&self, pixel_values: Option<&Tensor<4>>) -> Result<ResNetOutput> {
        self.forward_with(pixel_values, &ForwardContext::default())
    }

    /// [`forward`](Self::forward) with a per-call context (e.g. a different adapter per image,
    /// [`ForwardContext::mixed`]).
    pub fn forward_with(
        &self,
        pixel_values: Option<&Tensor<4>>,
        fc: &ForwardContext,
    ) -> Result<ResNetOutput> {
        input_checks::pixel_dims(pixel_values, self.num_channels)?;
        let Some(pixels) = pixel_values else {
            unreachable!("pixel_dims checks that pixel_values are present")
        };
        let h = self.embedder.embedder.forward(pixels.clone(), fc);
        let pool = MaxPoolOptions::new([3, 3])
            .with_stride([2, 2])
            .with_padding([1, 1]);
        let mut h = max_pool2d(h, pool);
        for stage in &self.encoder.stages {
            for layer in &stage.layers {
                h = layer.forward(h, fc);
            }
        }
        let [b, c, _, _] = h.dims();
        let pooler_output = h.clone().mean_dim(3).mean_dim(2).reshape([b, c]);
        Ok(ResNetOutput {
            last_hidden_state: h,
            pooler_output,
        })
    }
}

/// `classifier`: transformers' `Sequential(Flatten, Linear)`, the linear being `classifier.1`.
#[derive(Module, Debug, Adaptable)]
pub struct ResNetClassifier {
    /// `classifier.1` (`classifier.linear` in this module tree).
    #[peft(rename = "1")]
    pub linear: Linear,
}

/// `ResNetForImageClassification`: pooled features -> `classifier.1`.
#[derive(Module, Debug, Adaptable)]
#[peft(classifier_head = "classifier.1")]
pub struct ResNetForImageClassification {
    /// The backbone (`resnet.` in checkpoints).
    pub resnet: ResNetModel,
    /// Classification head.
    pub classifier: ResNetClassifier,
}

impl ResNetForImageClassification {
    /// An uninitialized classifier with `num_labels` outputs.
    pub fn new(c: &ResNetConfig, num_labels: usize, device: &Device) -> Self {
        let hidden = c.hidden_sizes.last().copied().unwrap_or(c.embedding_size);
        Self {
            resnet: ResNetModel::new(c, device),
            classifier: ResNetClassifier {
                linear: LinearConfig::new(hidden, num_labels).init(device),
            },
        }
    }

    /// Logits `[b, num_labels]`, with a per-call context.
    pub fn forward_with(
        &self,
        pixel_values: Option<&Tensor<4>>,
        fc: &ForwardContext,
    ) -> Result<Tensor<2>> {
        let out = self.resnet.forward_with(pixel_values, fc)?;
        Ok(self.classifier.linear.forward_in(out.pooler_output, fc))
    }
}
