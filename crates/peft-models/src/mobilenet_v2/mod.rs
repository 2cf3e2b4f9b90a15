//! torchvision's MobileNetV2 (`torchvision.models.mobilenet_v2`, Sandler et al. 2018), with
//! torchvision's module names (`features.3.conv.1.0`, `classifier.1`), so PEFT `target_modules`
//! and bundles written against the PyTorch model apply unchanged. Read from torchvision's `.pth`
//! state dicts through burn-store's PyTorch reader ([`crate::torchvision`]) or from a folder
//! this crate saved (`config.json` with `model_type: "torchvision_mobilenet_v2"` and
//! `model.safetensors`).
//!
//! The layers follow `torchvision/models/mobilenetv2.py` (0.29): a 3x3 stride-2 stem, 17
//! inverted residual blocks (1x1 expansion unless the ratio is 1, 3x3 depthwise, 1x1 linear
//! projection; a residual when the stride is 1 and the widths agree), a 1x1 convolution to 1280
//! channels, global average pooling, dropout and the linear classifier. Every convolution and
//! the classifier are adapter-aware layers; BatchNorm is Burn's (on an autodiff device it uses
//! the batch's statistics and updates the running ones, as PyTorch's `train()` mode does).

mod arch;
mod names;

use burn::module::Module;
use burn::nn::{BatchNorm, BatchNormConfig, Dropout, DropoutConfig};
use burn::tensor::{Device, Tensor};
use peft_core::nn::{Conv2d, Conv2dConfig, ForwardContext, KvPrefix, Linear, LinearConfig};
use peft_core::{Adaptable, Site, SiteMut, SitePath};

pub use arch::{ARCHITECTURE, MODEL_TYPE, MobileNetV2Config};
pub(crate) use arch::detect;

/// `Conv2d` + `BatchNorm2d` (+ ReLU6): torchvision's `Conv2dNormActivation` (`.0`, `.1`).
#[derive(Module, Debug)]
pub struct ConvBn {
    /// The convolution (bias-free).
    pub conv: Conv2d,
    /// Its BatchNorm (epsilon 1e-5, momentum 0.1).
    pub bn: BatchNorm,
}

impl ConvBn {
    fn new(
        channels: [usize; 2],
        kernel: usize,
        stride: usize,
        groups: usize,
        device: &Device,
    ) -> Self {
        let padding = (kernel - 1) / 2;
        Self {
            conv: Conv2dConfig::new(channels, [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding([padding, padding])
                .with_groups(groups)
                .with_bias(false)
                .init(device),
            bn: BatchNormConfig::new(channels[1]).init(device),
        }
    }

    /// Convolution and BatchNorm, without the activation.
    fn forward(&self, x: Tensor<4>, fc: &ForwardContext) -> Tensor<4> {
        self.bn.forward(self.conv.forward_in(x, fc))
    }

    fn forward_relu6(&self, x: Tensor<4>, fc: &ForwardContext) -> Tensor<4> {
        self.forward(x, fc).clamp(0.0, 6.0)
    }

    /// `prefix.0` (the convolution) as a site.
    fn visit(&self, path: &mut SitePath, visitor: &mut dyn FnMut(&SitePath, Site<'_>)) {
        path.push("0");
        self.conv.visit_sites(path, visitor);
        path.pop();
    }

    fn visit_mut(&mut self, path: &mut SitePath, visitor: &mut dyn FnMut(&SitePath, SiteMut<'_>)) {
        path.push("0");
        self.conv.visit_sites_mut(path, visitor);
        path.pop();
    }
}

/// torchvision's `InvertedResidual`: `conv.0` the 1x1 expansion (absent at ratio 1), then the
/// 3x3 depthwise, the 1x1 projection and its BatchNorm, numbered on from there.
#[derive(Module, Debug)]
pub struct InvertedResidual {
    /// 1x1 expansion + BatchNorm + ReLU6 (`conv.0`), when the expand ratio is not 1.
    pub expand: Option<ConvBn>,
    /// 3x3 depthwise + BatchNorm + ReLU6.
    pub depthwise: ConvBn,
    /// 1x1 linear projection (no activation).
    pub project: Conv2d,
    /// BatchNorm of the projection.
    pub project_bn: BatchNorm,
    /// Whether the block adds its input (stride 1, same width).
    pub residual: bool,
}

impl InvertedResidual {
    fn new(input: usize, output: usize, stride: usize, ratio: usize, device: &Device) -> Self {
        let hidden = input * ratio;
        Self {
            expand: (ratio != 1).then(|| ConvBn::new([input, hidden], 1, 1, 1, device)),
            depthwise: ConvBn::new([hidden, hidden], 3, stride, hidden, device),
            project: Conv2dConfig::new([hidden, output], [1, 1])
                .with_bias(false)
                .init(device),
            project_bn: BatchNormConfig::new(output).init(device),
            residual: stride == 1 && input == output,
        }
    }

    fn forward(&self, x: Tensor<4>, fc: &ForwardContext) -> Tensor<4> {
        let mut h = x.clone();
        if let Some(expand) = &self.expand {
            h = expand.forward_relu6(h, fc);
        }
        h = self.depthwise.forward_relu6(h, fc);
        h = self.project_bn.forward(self.project.forward_in(h, fc));
        if self.residual { x + h } else { h }
    }

    /// The index of each part under `conv.` (torchvision numbers the layers it built).
    fn indices(&self) -> [usize; 3] {
        let first = usize::from(self.expand.is_some());
        [first, first + 1, first + 2]
    }
}

impl Adaptable for InvertedResidual {
    fn visit_sites(&self, path: &mut SitePath, visitor: &mut dyn FnMut(&SitePath, Site<'_>)) {
        let [dw, project, _] = self.indices();
        path.push("conv");
        if let Some(expand) = &self.expand {
            path.push("0");
            expand.visit(path, visitor);
            path.pop();
        }
        path.push(dw.to_string());
        self.depthwise.visit(path, visitor);
        path.pop();
        path.push(project.to_string());
        self.project.visit_sites(path, visitor);
        path.pop();
        path.pop();
    }

    fn visit_sites_mut(
        &mut self,
        path: &mut SitePath,
        visitor: &mut dyn FnMut(&SitePath, SiteMut<'_>),
    ) {
        let [dw, project, _] = self.indices();
        path.push("conv");
        if let Some(expand) = &mut self.expand {
            path.push("0");
            expand.visit_mut(path, visitor);
            path.pop();
        }
        path.push(dw.to_string());
        self.depthwise.visit_mut(path, visitor);
        path.pop();
        path.push(project.to_string());
        self.project.visit_sites_mut(path, visitor);
        path.pop();
        path.pop();
    }
}

/// torchvision's MobileNetV2: `features.0` (stem), `features.1..=17` (blocks), `features.18`
/// (the last 1x1 convolution), `classifier.1` (the linear head, absent for the bare feature
/// extractor).
#[derive(Module, Debug)]
pub struct MobileNetV2 {
    /// `features.0`.
    pub stem: ConvBn,
    /// `features.1` ..
    pub blocks: Vec<InvertedResidual>,
    /// The last `features.N`.
    pub head: ConvBn,
    /// `classifier.0`.
    pub dropout: Dropout,
    /// `classifier.1`.
    pub classifier: Option<Linear>,
    /// No attention: prefix tuning has no site here (this stays empty and is not visited).
    #[module(skip)]
    pub no_prefix: KvPrefix,
}

/// torchvision's inverted residual settings: expand ratio, channels, repeats, first stride.
const SETTINGS: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// torchvision's `_make_divisible(v, 8)`: the nearest multiple of 8, never 10% below `v`.
pub(crate) fn make_divisible(value: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut rounded = ((value + d / 2.0) / d).floor() * d;
    rounded = rounded.max(d);
    if rounded < 0.9 * value {
        rounded += d;
    }
    rounded as usize
}

impl MobileNetV2 {
    /// The model of `config` (lazily initialized), with a classifier of `num_classes` outputs
    /// or none (the feature extractor).
    pub fn new(config: &MobileNetV2Config, num_classes: Option<usize>, device: &Device) -> Self {
        let width = |c: usize| make_divisible(c as f64 * config.width_mult, 8);
        let mut input = width(32);
        let last = make_divisible(1280.0 * config.width_mult.max(1.0), 8);
        let stem = ConvBn::new([3, input], 3, 2, 1, device);
        let mut blocks = Vec::new();
        for (ratio, channels, repeats, stride) in SETTINGS {
            let output = width(channels);
            for i in 0..repeats {
                let s = if i == 0 { stride } else { 1 };
                blocks.push(InvertedResidual::new(input, output, s, ratio, device));
                input = output;
            }
        }
        Self {
            stem,
            blocks,
            head: ConvBn::new([input, last], 1, 1, 1, device),
            dropout: DropoutConfig::new(config.dropout).init(),
            classifier: num_classes.map(|n| LinearConfig::new(last, n).init(device)),
            no_prefix: KvPrefix::new(0, 1, 1, 1, 1),
        }
    }

    /// The pooled features `[b, 1280]` (before dropout and the classifier).
    pub fn features(&self, x: Tensor<4>, fc: &ForwardContext) -> Tensor<2> {
        let mut h = self.stem.forward_relu6(x, fc);
        for block in &self.blocks {
            h = block.forward(h, fc);
        }
        let h = self.head.forward_relu6(h, fc);
        let [b, c, _, _] = h.dims();
        h.mean_dim(3).mean_dim(2).reshape([b, c])
    }

    /// Class logits `[b, classes]`, when the model has a classifier.
    pub fn logits(&self, pooled: Tensor<2>, fc: &ForwardContext) -> Option<Tensor<2>> {
        let classifier = self.classifier.as_ref()?;
        Some(classifier.forward_in(self.dropout.forward(pooled), fc))
    }

    /// `features.N` of the last 1x1 convolution.
    fn head_index(&self) -> usize {
        self.blocks.len() + 1
    }
}

impl Adaptable for MobileNetV2 {
    fn visit_sites(&self, path: &mut SitePath, visitor: &mut dyn FnMut(&SitePath, Site<'_>)) {
        path.push("features");
        path.push("0");
        self.stem.visit(path, visitor);
        path.pop();
        for (i, block) in self.blocks.iter().enumerate() {
            path.push((i + 1).to_string());
            block.visit_sites(path, visitor);
            path.pop();
        }
        path.push(self.head_index().to_string());
        self.head.visit(path, visitor);
        path.pop();
        path.pop();
        if let Some(classifier) = &self.classifier {
            path.push("classifier");
            path.push("1");
            classifier.visit_sites(path, visitor);
            path.pop();
            path.pop();
        }
    }

    fn visit_sites_mut(
        &mut self,
        path: &mut SitePath,
        visitor: &mut dyn FnMut(&SitePath, SiteMut<'_>),
    ) {
        let head_index = self.head_index();
        path.push("features");
        path.push("0");
        self.stem.visit_mut(path, visitor);
        path.pop();
        for (i, block) in self.blocks.iter_mut().enumerate() {
            path.push((i + 1).to_string());
            block.visit_sites_mut(path, visitor);
            path.pop();
        }
        path.push(head_index.to_string());
        self.head.visit_mut(path, visitor);
        path.pop();
        path.pop();
        if let Some(classifier) = &mut self.classifier {
            path.push("classifier");
            path.push("1");
            classifier.visit_sites_mut(path, visitor);
            path.pop();
            path.pop();
        }
    }

    fn classifier_head(&self) -> Option<String> {
        self.classifier.as_ref().map(|_| "classifier.1".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_round_as_torchvision() {
        assert_eq!(make_divisible(32.0, 8), 32);
        assert_eq!(make_divisible(32.0 * 0.35, 8), 16);
        assert_eq!(make_divisible(24.0 * 0.5, 8), 16);
        assert_eq!(make_divisible(1280.0, 8), 1280);
    }

    #[test]
    fn sites_carry_torchvision_names() {
        let device = Device::flex();
        let config = MobileNetV2Config::default();
        let model = MobileNetV2::new(&config, Some(10), &device);
        let sites: Vec<String> = peft_core::list_sites(&model)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(model.blocks.len(), 17);
        assert_eq!(sites[0], "features.0.0");
        assert_eq!(sites[1], "features.1.conv.0.0"); // depthwise of the ratio-1 block
        assert_eq!(sites[2], "features.1.conv.1"); // its projection
        assert_eq!(sites[3], "features.2.conv.0.0"); // expansion
        assert_eq!(sites[4], "features.2.conv.1.0");
        assert_eq!(sites[5], "features.2.conv.2");
        assert!(sites.contains(&"features.18.0".to_string()));
        assert_eq!(sites.last().unwrap(), "classifier.1");
    }
}
