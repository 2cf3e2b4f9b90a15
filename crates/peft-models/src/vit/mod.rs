//! ViT (transformers' `ViTModel`, `ViTForImageClassification`): a patch convolution, a class
//! token and learned positions, pre-norm encoder layers (exact GELU), a final LayerNorm, the
//! tanh pooler on the class token.

mod arch;
mod config;
mod names;

pub use arch::{ARCHITECTURE, Vit};
pub use config::{Size2, VitConfig};

use burn::module::{Module, Param};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig};
use burn::tensor::activation::tanh;
use burn::tensor::{Device, Tensor};
use peft_core::Adaptable;
use peft_core::nn::{Conv2d, Conv2dConfig, ForwardContext, KvPrefix, Linear, LinearConfig};
use peft_ops::nn::layer_norm;

use crate::error::{ModelError, Result};
use crate::input_checks;
use crate::ops::{Activation, merge_heads, sdpa, split_heads};

/// `embeddings.patch_embeddings`.
#[derive(Module, Debug, Adaptable)]
pub struct VitPatchEmbeddings {
    /// The patch convolution (kernel = stride = patch size).
    pub projection: Conv2d,
}

/// `embeddings`: class token, patches, positions.
#[derive(Module, Debug, Adaptable)]
pub struct VitEmbeddings {
    /// `[1, 1, hidden]`.
    pub cls_token: Param<Tensor<3>>,
    /// Patches.
    pub patch_embeddings: VitPatchEmbeddings,
    /// `[1, patches + 1, hidden]`.
    pub position_embeddings: Param<Tensor<3>>,
}

/// `attention` (transformers 5 names; checkpoints' `attention.attention.query` ...).
#[derive(Module, Debug, Adaptable)]
pub struct VitAttention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    #[module(skip)]
    heads: usize,
}

/// `mlp`.
#[derive(Module, Debug, Adaptable)]
pub struct VitMlp {
    /// Up projection (`intermediate.dense` in checkpoints).
    pub fc1: Linear,
    /// Down projection (`output.dense` in checkpoints).
    pub fc2: Linear,
    /// `hidden_act`.
    #[module(skip)]
    pub act: Activation,
}

/// One pre-norm encoder layer.
#[derive(Module, Debug, Adaptable)]
pub struct VitLayer {
    /// Attention.
    pub attention: VitAttention,
    /// Norm before the attention.
    pub layernorm_before: LayerNorm,
    /// Norm before the MLP.
    pub layernorm_after: LayerNorm,
    /// MLP.
    pub mlp: VitMlp,
}

/// `pooler`: tanh(dense(class token)).
#[derive(Module, Debug, Adaptable)]
pub struct VitPooler {
    /// Projection.
    pub dense: Linear,
}

/// `ViTModel`.
#[derive(Module, Debug, Adaptable)]
pub struct VitModel {
    /// Embeddings.
    pub embeddings: VitEmbeddings,
    /// Encoder layers (`encoder.layer` in checkpoints).
    pub layers: Vec<VitLayer>,
    /// Final norm.
    pub layernorm: LayerNorm,
    /// Pooler (`ViTForImageClassification` has none).
    pub pooler: Option<VitPooler>,
    /// The attention prefix site, kept out of the adapter sites: transformers' ViT takes no
    /// past keys and values and PEFT 0.21.2's prefix tuning fails on it (`ViTConfig` has no
    /// `vocab_size`), so there is nothing to match; here adding it is
    /// [`PeftError::UnsupportedSite`](peft_core::PeftError::UnsupportedSite).
    #[peft(skip)]
    pub prompt_encoder: KvPrefix,
    #[module(skip)]
    layer_norm_eps: f64,
    /// `image_size` of the config, `[height, width]`.
    #[module(skip)]
    image_size: [usize; 2],
}

/// `ViTForImageClassification`: final-norm class token -> `classifier`.
#[derive(Module, Debug, Adaptable)]
#[peft(classifier_head = "classifier")]
pub struct VitForImageClassification {
    /// The encoder (without pooler).
    pub vit: VitModel,
    /// Classification head.
    pub classifier: Linear,
}

/// What a ViT forward returns.
#[derive(Debug, Clone)]
pub struct VitOutput {
    /// `[b, patches + 1, hidden]`, after the final norm.
    pub last_hidden_state: Tensor<3>,
    /// `[b, pooler_output_size]`, when the model has a pooler.
    pub pooler_output: Option<Tensor<2>>,
}

fn class_token(h: &Tensor<3>) -> Tensor<2> {
    let [b, _, d] = h.dims();
    h.clone().slice([0..b, 0..1, 0..d]).reshape([b, d])
}

impl VitModel {
    /// An uninitialized (lazy) model of this shape.
    pub fn new(c: &VitConfig, pooler: bool, device: &Device) -> Self {
        let d = c.hidden_size;
        let norm = || {
            LayerNormConfig::new(d)
                .with_epsilon(c.layer_norm_eps)
                .init(device)
        };
        let linear = |i: usize, o: usize| LinearConfig::new(i, o).init(device);
        let qkv = || LinearConfig::new(d, d).with_bias(c.qkv_bias).init(device);
        let patch = c.patch_size.hw();
        Self {
            embeddings: VitEmbeddings {
                cls_token: Initializer::Zeros.init([1, 1, d], device),
                patch_embeddings: VitPatchEmbeddings {
                    projection: Conv2dConfig::new([c.num_channels, d], patch)
                        .with_stride(patch)
                        .init(device),
                },
                position_embeddings: Initializer::Zeros.init([1, c.num_patches() + 1, d], device),
            },
            layers: (0..c.num_hidden_layers)
                .map(|_| VitLayer {
                    attention: VitAttention {
                        q_proj: qkv(),
                        k_proj: qkv(),
                        v_proj: qkv(),
                        o_proj: linear(d, d),
                        heads: c.num_attention_heads,
                    },
                    layernorm_before: norm(),
                    layernorm_after: norm(),
                    mlp: VitMlp {
                        fc1: linear(d, c.intermediate_size),
                        fc2: linear(c.intermediate_size, d),
                        // Checked when the config was read.
                        act: Activation::from_hf(&c.hidden_act).unwrap_or_default(),
                    },
                })
                .collect(),
            layernorm: norm(),
            pooler: pooler.then(|| VitPooler {
                dense: linear(d, c.pooler_size()),
            }),
            prompt_encoder: KvPrefix::new(
                c.num_hidden_layers,
                c.num_attention_heads,
                c.num_attention_heads,
                d / c.num_attention_heads,
                d,
            ),
            layer_norm_eps: c.layer_norm_eps,
            image_size: c.image_hw(),
        }
    }

    /// Encode `pixel_values` `[b, channels, height, width]`. Missing or empty images, another
    /// channel count or another image size than the config's are
    /// [`ModelError::InputOutOfRange`].
    pub fn forward(&self, pixel_values: Option<&Tensor<4>>) -> Result<VitOutput> {
        self.forward_with(pixel_values, &ForwardContext::default())
    }

    /// [`forward`](Self::forward) with a per-call context (e.g. a different adapter per image,
    /// [`ForwardContext::mixed`]).
    pub fn forward_with(
        &self,
        pixel_values: Option<&Tensor<4>>,
        fc: &ForwardContext,
    ) -> Result<VitOutput> {
        let e = &self.embeddings;
        let proj = &e.patch_embeddings.projection;
        let [b, _, h, w] = input_checks::pixel_dims(pixel_values, proj.in_channels())?;
        input_checks::image_size([h, w], self.image_size)?;
        if let Some(rows) = fc.rows()
            && rows.batch() != b
        {
            return Err(ModelError::InputOutOfRange {
                input: "adapter_names".into(),
                found: format!("{} names", rows.batch()),
                limit: format!("the batch has {b} images"),
                fix: "name one adapter (or `__base__`) per image".into(),
            });
        }
        let pixels = pixel_values.cloned().expect("checked by pixel_dims");
        let patches = proj.forward_in(pixels, fc);
        let [_, d, gh, gw] = patches.dims();
        let patches = patches.reshape([b, d, gh * gw]).swap_dims(1, 2);
        let cls = e.cls_token.val().expand([b, 1, d]);
        let positions = e.position_embeddings.val().expand([b, gh * gw + 1, d]);
        let mut x = Tensor::cat(vec![cls, patches], 1) + positions;
        let eps = self.layer_norm_eps;
        for layer in &self.layers {
            let a = &layer.attention;
            let n = layer_norm(&layer.layernorm_before, eps, x.clone(), None);
            let q = split_heads(a.q_proj.forward_in(n.clone(), fc), a.heads);
            let k = split_heads(a.k_proj.forward_in(n.clone(), fc), a.heads);
            let v = split_heads(a.v_proj.forward_in(n, fc), a.heads);
            let ctx = merge_heads(sdpa(q, k, v, None, false, None));
            x = x + a.o_proj.forward_in(ctx, fc);
            let n = layer_norm(&layer.layernorm_after, eps, x.clone(), None);
            let up = layer.mlp.act.apply(layer.mlp.fc1.forward_in(n, fc));
            x = x + layer.mlp.fc2.forward_in(up, fc);
        }
        let x = layer_norm(&self.layernorm, eps, x, None);
        let pooler_output = self
            .pooler
            .as_ref()
            .map(|p| tanh(p.dense.forward_in(class_token(&x), fc)));
        Ok(VitOutput {
            last_hidden_state: x,
            pooler_output,
        })
    }
}

impl VitForImageClassification {
    /// An uninitialized classifier with `num_labels` outputs.
    pub fn new(c: &VitConfig, num_labels: usize, device: &Device) -> Self {
        Self {
            vit: VitModel::new(c, false, device),
            classifier: LinearConfig::new(c.hidden_size, num_labels).init(device),
        }
    }

    /// Logits `[b, num_labels]` of the final-norm class token.
    pub fn forward(&self, pixel_values: Option<&Tensor<4>>) -> Result<Tensor<2>> {
        self.forward_with(pixel_values, &ForwardContext::default())
    }

    /// [`forward`](Self::forward) with a per-call context.
    pub fn forward_with(
        &self,
        pixel_values: Option<&Tensor<4>>,
        fc: &ForwardContext,
    ) -> Result<Tensor<2>> {
        let out = self.vit.forward_with(pixel_values, fc)?;
        Ok(self
            .classifier
            .forward_in(class_token(&out.last_hidden_state), fc))
    }
}
