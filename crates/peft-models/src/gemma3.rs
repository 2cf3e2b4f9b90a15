//! Gemma 3 text (`gemma3_text`): RMSNorms scaled by `1 + weight`, token embeddings scaled by
//! `sqrt(hidden_size)`, four norms per layer (before and after attention and MLP), GeGLU with
//! the tanh GELU, scores scaled by `query_pre_attn_scalar^-1/2`, per-head q/k norms,
//! sliding-window layers interleaved with global ones per `layer_types`, each layer type with
//! its own RoPE (`rope_local_base_freq` for sliding layers, `rope_theta` and the scaling for
//! global ones), and final logit soft-capping. transformers' `models/gemma3/modeling_gemma3.py`
//! and `configuration_gemma3.py`.
//!
//! `attn_logit_softcapping` is parsed and ignored, as transformers 5.24 does: its Gemma 3
//! attention never passes the cap to the attention function.

use std::path::Path;
use std::sync::Arc;

use burn::module::Module;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::{Bool, Device, Int, Tensor};
use peft_core::Adaptable;
use peft_core::nn::{Embedding, EmbeddingConfig, ForwardContext, KvPrefix, Linear, LinearConfig};
use serde::Deserialize;
use serde_json::Value;

use crate::arch::{ArchConfig, Architecture, Checkpoint, GgufArch, GgufFix, GgufSpec, PeftDefaults};
use crate::auto::{HfModel, Task};
use crate::cache::KvCache;
use crate::config::{HfConfig, parse_json};
use crate::config_checks::{activation, flag, invalid, positive_float, unsupported};
use crate::decoder::{
    self, CausalAttention, DecoderBackbone, DecoderHeads, DecoderShape, GatedMlp, HeadShape,
    layer_windows,
};
use crate::error::Result;
use crate::ops::{Activation, split_heads};
use crate::rope::{Rope, RopeConfig, RopeContext, Rotary};

/// The family's registration: `gemma3_text`.
pub static ARCHITECTURE: Architecture = Architecture {
    model_types: &["gemma3_text"],
    parse: parse_config,
    gguf: Some(&GGUF),
};

/// llama.cpp's `gemma3` files (the text backbone; gguf-py's tensor names; its norms stored as
/// `1 + w`; transformers' `GGUF_CONFIG_MAPPING` reads the head size and the window).
static GGUF: GgufSpec = GgufSpec {
    architectures: &[GgufArch {
        name: "gemma3",
        model_type: "gemma3_text",
        fix: GgufFix::GemmaNormPlusOne,
    }],
    config_keys: &[
        ("gemma3.attention.key_length", "head_dim"),
        ("gemma3.attention.sliding_window", "sliding_window"),
    ],
    globals: &[
        ("token_embd", "model.embed_tokens"),
        ("output_norm", "model.norm"),
        ("output", "lm_head"),
    ],
    layer: &[
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("post_attention_norm", "post_attention_layernorm"),
        ("ffn_norm", "pre_feedforward_layernorm"),
        ("post_ffw_norm", "post_feedforward_layernorm"),
        ("attn_q_norm", "self_attn.q_norm"),
        ("attn_k_norm", "self_attn.k_norm"),
    ],
};

/// PEFT's defaults for `gemma3_text` (`peft/utils/constants.py`).
const PEFT: PeftDefaults = PeftDefaults {
    lora: Some(&["q_proj", "v_proj"]),
    ia3: Some(&["q_proj", "v_proj", "down_proj"]),
    ia3_feedforward: Some(&["down_proj"]),
};

/// A Gemma 3 text model with its head (`Gemma3ForCausalLM`,
/// `Gemma3TextForSequenceClassification`).
pub type Gemma3 = DecoderHeads<Gemma3TextModel>;

fn default_activation() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_true() -> bool {
    true
}
fn default_scalar() -> f64 {
    256.0
}
fn default_window() -> Option<usize> {
    Some(4096)
}
fn default_pattern() -> usize {
    6
}

/// `Gemma3TextConfig`'s keys beyond the decoder shape, with its defaults.
#[derive(Debug, Deserialize)]
struct GemmaKeys {
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_local_base_freq: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default = "default_true")]
    tie_word_embeddings: bool,
    #[serde(default = "default_activation")]
    hidden_activation: String,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default = "default_scalar")]
    query_pre_attn_scalar: f64,
    #[serde(default = "default_window")]
    sliding_window: Option<usize>,
    #[serde(default = "default_pattern")]
    sliding_window_pattern: usize,
    #[serde(default)]
    final_logit_softcapping: Option<f64>,
}

/// A checked `Gemma3TextConfig`.
#[derive(Debug, Clone)]
pub struct Gemma3Config {
    /// Sizes.
    pub shape: DecoderShape,
    /// RoPE of the global (`full_attention`) layers.
    pub global_rope: RopeConfig,
    /// RoPE of the sliding (`sliding_attention`) layers.
    pub local_rope: RopeConfig,
    /// Whether lm_head shares embed_tokens.
    pub tie_word_embeddings: bool,
    /// The MLP's gate activation (`hidden_activation`).
    pub activation: Activation,
    /// Bias on q/k/v/o.
    pub attention_bias: bool,
    /// Score scale `query_pre_attn_scalar^-1/2`.
    pub scale: f64,
    /// The attention window of each layer (`None`: a global layer).
    pub windows: Vec<Option<usize>>,
    /// `final_logit_softcapping`.
    pub final_logit_softcapping: Option<f64>,
}

fn parse_config(_: &str, raw: &Value, file: &Path) -> Result<Arc<dyn ArchConfig>> {
    let mut shape: DecoderShape = parse_json(raw, file)?;
    // `Gemma3TextConfig`'s defaults where the file says nothing.
    shape.head_dim.get_or_insert(256);
    shape.num_key_value_heads.get_or_insert(4);
    shape.validate(file)?;
    let keys: GemmaKeys = parse_json(raw, file)?;
    let activation = activation(file, "hidden_activation", &keys.hidden_activation)?;
    if flag(raw, "use_bidirectional_attention") {
        return Err(unsupported(
            file,
            "use_bidirectional_attention",
            true,
            "Gemma 3 is implemented as a causal decoder (EmbeddingGemma's bidirectional \
             attention is not)",
        ));
    }
    positive_float(file, "query_pre_attn_scalar", keys.query_pre_attn_scalar)?;
    if keys.sliding_window == Some(0) {
        return Err(invalid(
            file,
            "sliding_window",
            0,
            "must be a positive integer or null",
        ));
    }
    if let Some(cap) = keys.final_logit_softcapping {
        positive_float(file, "final_logit_softcapping", cap)?;
    }
    let (global_rope, local_rope) = ropes(&keys, &shape, file)?;
    let layers = shape.num_hidden_layers;
    let pattern = keys.sliding_window_pattern.max(1);
    // `"sliding_attention" if bool((i + 1) % sliding_window_pattern) else "full_attention"`.
    let windows = layer_windows(raw, file, layers, keys.sliding_window, || {
        (0..layers)
            .map(|i| keys.sliding_window.filter(|_| (i + 1) % pattern != 0))
            .collect()
    })?;
    Ok(Arc::new(Gemma3Config {
        global_rope,
        local_rope,
        tie_word_embeddings: keys.tie_word_embeddings,
        activation,
        attention_bias: keys.attention_bias,
        scale: keys.query_pre_attn_scalar.powf(-0.5),
        windows,
        final_logit_softcapping: keys.final_logit_softcapping,
        shape,
    }))
}

/// The RoPE of global and sliding layers. transformers 5 writes `rope_parameters` per layer
/// type; older files give `rope_theta` (1e6 by default) with `rope_scaling` for the global
/// layers and `rope_local_base_freq` (1e4) for the sliding ones
/// (`Gemma3TextConfig.convert_rope_params_to_dict`).
fn ropes(
    keys: &GemmaKeys,
    shape: &DecoderShape,
    file: &Path,
) -> Result<(RopeConfig, RopeConfig)> {
    let per_type = keys
        .rope_parameters
        .as_ref()
        .filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
    let parse = |block: Option<&Value>, key: &str, theta: f64| {
        RopeConfig::parse(
            block,
            &RopeContext {
                file,
                key,
                theta,
                head_dim: shape.head_size(),
                partial_rotary_factor: 1.0,
                max_position_embeddings: shape.max_position_embeddings,
            },
        )
    };
    let global_theta = keys.rope_theta.unwrap_or(1_000_000.0);
    let local_theta = keys.rope_local_base_freq.unwrap_or(10_000.0);
    match per_type {
        Some(p) => Ok((
            parse(
                p.get("full_attention"),
                "rope_parameters.full_attention",
                global_theta,
            )?,
            parse(
                p.get("sliding_attention"),
                "rope_parameters.sliding_attention",
                local_theta,
            )?,
        )),
        None => {
            let (block, key) = match (&keys.rope_scaling, &keys.rope_parameters) {
                (Some(s), _) if !s.is_null() => (Some(s), "rope_scaling"),
                (_, p) => (p.as_ref(), "rope_parameters"),
            };
            Ok((
                parse(block, key, global_theta)?,
                parse(None, "rope_local_base_freq", local_theta)?,
            ))
        }
    }
}

impl ArchConfig for Gemma3Config {
    fn min_parameters(&self) -> u128 {
        self.shape.min_parameters()
    }

    fn build(
        &self,
        config: &HfConfig,
        task: Task,
        weights: Option<&Checkpoint>,
        device: &Device,
    ) -> Result<HfModel> {
        let shape = HeadShape {
            hidden_size: self.shape.hidden_size,
            vocab_size: self.shape.vocab_size,
            tie_word_embeddings: self.tie_word_embeddings,
            pad_token_id: self.shape.pad_token_id,
        };
        let backbone = Gemma3TextModel::new(self, device);
        DecoderHeads::build(config, task, backbone, shape, weights, &[], device)
    }
}

/// `Gemma3RMSNorm`: `x / sqrt(mean(x²) + eps) * (1 + weight)` (the weight is stored as the
/// offset from one; Burn's `RmsNorm` holds it as `gamma`, loaded from `weight`).
fn gemma_norm<const D: usize>(norm: &RmsNorm, x: Tensor<D>) -> Tensor<D> {
    peft_ops::rms_norm(x, norm.gamma.val().add_scalar(1.0), norm.epsilon)
}

/// Self-attention with per-head norms and Gemma's score scale.
#[derive(Module, Debug, Adaptable)]
pub struct Gemma3Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    /// Norm over `head_dim` of each query head.
    pub q_norm: RmsNorm,
    /// Norm over `head_dim` of each key head.
    pub k_norm: RmsNorm,
    #[module(skip)]
    attention: CausalAttention,
}

/// One decoder layer.
#[derive(Module, Debug, Adaptable)]
pub struct Gemma3DecoderLayer {
    /// Attention.
    pub self_attn: Gemma3Attention,
    /// GeGLU MLP.
    pub mlp: GatedMlp,
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Norm of the attention output.
    pub post_attention_layernorm: RmsNorm,
    /// Norm before the MLP.
    pub pre_feedforward_layernorm: RmsNorm,
    /// Norm of the MLP output.
    pub post_feedforward_layernorm: RmsNorm,
}

/// The decoder stack (`model.` in checkpoints).
#[derive(Module, Debug, Adaptable)]
pub struct Gemma3TextModel {
    /// Token embeddings (scaled by `sqrt(hidden_size)` in the forward).
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<Gemma3DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Attention key/value prefix site (prefix tuning).
    pub prompt_encoder: KvPrefix,
    #[module(skip)]
    global_rotary: Rotary,
    #[module(skip)]
    local_rotary: Rotary,
    #[module(skip)]
    final_logit_softcapping: Option<f64>,
}

impl Gemma3Attention {
    fn new(c: &Gemma3Config, window: Option<usize>, device: &Device) -> Self {
        let shape = &c.shape;
        let (h, kv, d) = (shape.num_attention_heads, shape.kv_heads(), shape.head_size());
        let linear = |i: usize, o: usize| {
            LinearConfig::new(i, o)
                .with_bias(c.attention_bias)
                .init(device)
        };
        let norm = || {
            RmsNormConfig::new(d)
                .with_epsilon(shape.rms_norm_eps)
                .init(device)
        };
        Self {
            q_proj: linear(shape.hidden_size, h * d),
            k_proj: linear(shape.hidden_size, kv * d),
            v_proj: linear(shape.hidden_size, kv * d),
            o_proj: linear(h * d, shape.hidden_size),
            q_norm: norm(),
            k_norm: norm(),
            attention: CausalAttention {
                heads: h,
                kv_heads: kv,
                window,
                scale: Some(c.scale),
            },
        }
    }

    fn forward(
        &self,
        x: Tensor<3>,
        rope: &Rope,
        mask: Option<&Tensor<4, Bool>>,
        cache: Option<(&mut KvCache, usize)>,
        fc: &ForwardContext,
    ) -> Tensor<3> {
        let (heads, kv_heads) = (self.attention.heads, self.attention.kv_heads);
        let q = gemma_norm(
            &self.q_norm,
            split_heads(self.q_proj.forward_in(x.clone(), fc), heads),
        );
        let k = gemma_norm(
            &self.k_norm,
            split_heads(self.k_proj.forward_in(x.clone(), fc), kv_heads),
        );
        let v = split_heads(self.v_proj.forward_in(x, fc), kv_heads);
        let out = self.attention.attend(q, k, v, rope, mask, cache);
        self.o_proj.forward_in(out, fc)
    }
}

impl Gemma3TextModel {
    /// An uninitialized (lazy) model of this shape; load weights into it.
    pub fn new(c: &Gemma3Config, device: &Device) -> Self {
        let shape = &c.shape;
        let norm = || {
            RmsNormConfig::new(shape.hidden_size)
                .with_epsilon(shape.rms_norm_eps)
                .init(device)
        };
        let (hidden, inter) = (shape.hidden_size, shape.intermediate_size);
        Self {
            embed_tokens: EmbeddingConfig::new(shape.vocab_size, hidden).init(device),
            layers: c
                .windows
                .iter()
                .map(|window| Gemma3DecoderLayer {
                    self_attn: Gemma3Attention::new(c, *window, device),
                    mlp: GatedMlp::new(hidden, inter, false, c.activation, device),
                    input_layernorm: norm(),
                    post_attention_layernorm: norm(),
                    pre_feedforward_layernorm: norm(),
                    post_feedforward_layernorm: norm(),
                })
                .collect(),
            norm: norm(),
            prompt_encoder: KvPrefix::new(
                shape.num_hidden_layers,
                shape.num_attention_heads,
                shape.kv_heads(),
                shape.head_size(),
                hidden,
            ),
            global_rotary: Rotary::new(&c.global_rope),
            local_rotary: Rotary::new(&c.local_rope),
            final_logit_softcapping: c.final_logit_softcapping,
        }
    }
}

impl DecoderBackbone for Gemma3TextModel {
    fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
        fc: &ForwardContext,
    ) -> Result<Tensor<3>> {
        let mut local = KvCache::new(self.layers.len());
        let decoder::Begun {
            dims: [b, s],
            mut cache,
            mask,
            packed,
        } = decoder::begin(
            &input_ids,
            self.embed_tokens.dims()[0],
            &self.prompt_encoder,
            attention_mask,
            cache,
            &mut local,
            fc,
        )?;
        let device = input_ids.device();
        let global = self.global_rotary.tables(cache.as_deref(), packed.as_ref(), b, s, &device);
        let local_rope = self.local_rotary.tables(cache.as_deref(), packed.as_ref(), b, s, &device);
        // `Gemma3TextScaledWordEmbedding`: the table times `sqrt(hidden_size)` in its dtype.
        let scale = (self.embed_tokens.dims()[1] as f64).sqrt() as f32;
        let mut h = self
            .embed_tokens
            .forward_in(input_ids, fc)
            .mul_scalar(scale);
        for (i, layer) in self.layers.iter().enumerate() {
            let rope = match layer.self_attn.attention.window {
                Some(_) => &local_rope,
                None => &global,
            };
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            let attn = layer.self_attn.forward(
                gemma_norm(&layer.input_layernorm, h.clone()),
                rope,
                mask.as_ref(),
                layer_cache,
                fc,
            );
            h = h + gemma_norm(&layer.post_attention_layernorm, attn);
            let mlp = layer
                .mlp
                .forward_in(gemma_norm(&layer.pre_feedforward_layernorm, h.clone()), fc);
            h = h + gemma_norm(&layer.post_feedforward_layernorm, mlp);
        }
        Ok(gemma_norm(&self.norm, h))
    }

    fn embed_tokens(&self) -> &Embedding {
        &self.embed_tokens
    }

    fn prompt_encoder(&self) -> &KvPrefix {
        &self.prompt_encoder
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn class_prefix(&self) -> &'static str {
        "Gemma3"
    }

    fn hf_class(&self, head: &str) -> String {
        // transformers' text-only classifier is `Gemma3TextForSequenceClassification`
        // (`Gemma3ForSequenceClassification` is the multimodal model's).
        match head {
            "ForSequenceClassification" => "Gemma3TextForSequenceClassification".into(),
            _ => format!("Gemma3{head}"),
        }
    }

    fn peft_defaults(&self) -> PeftDefaults {
        PEFT
    }

    fn final_logit_softcapping(&self) -> Option<f64> {
        self.final_logit_softcapping
    }
}
