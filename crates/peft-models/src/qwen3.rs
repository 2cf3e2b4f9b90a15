//! Qwen3 (`qwen3`): the Llama decoder with an RMSNorm on every query and key head (`q_norm`,
//! `k_norm`, over `head_dim`, after the projection and before RoPE), no q/k/v bias unless
//! `attention_bias`, and sliding-window layers when `use_sliding_window` (the layers from
//! `max_window_layers` on, or as `layer_types` says). transformers'
//! `models/qwen3/modeling_qwen3.py` and `configuration_qwen3.py`.

use std::path::Path;
use std::sync::Arc;

use burn::module::Module;
use burn::nn::{RmsNorm, RmsNormConfig};
use burn::tensor::{Bool, Device, Int, Tensor};
use peft_core::Adaptable;
use peft_core::nn::{Embedding, EmbeddingConfig, ForwardContext, KvPrefix, Linear, LinearConfig};
use peft_ops::nn::rms_norm;
use serde::Deserialize;
use serde_json::Value;

use crate::arch::{ArchConfig, Architecture, Checkpoint, GgufArch, GgufFix, GgufSpec, PeftDefaults};
use crate::auto::{HfModel, Task};
use crate::cache::KvCache;
use crate::config::{HfConfig, parse_json};
use crate::config_checks::unsupported;
use crate::decoder::{
    self, CausalAttention, DecoderBackbone, DecoderHeads, DecoderShape, GatedMlp, HeadShape,
    layer_windows, sliding_window,
};
use crate::error::Result;
use crate::ops::{Activation, split_heads};
use crate::rope::{Rope, RopeConfig, RopeContext, Rotary};

/// The family's registration: `qwen3`.
pub static ARCHITECTURE: Architecture = Architecture {
    model_types: &["qwen3"],
    parse: parse_config,
    gguf: Some(&GGUF),
};

/// llama.cpp's `qwen3` files (gguf-py's tensor names).
static GGUF: GgufSpec = GgufSpec {
    architectures: &[GgufArch {
        name: "qwen3",
        model_type: "qwen3",
        fix: GgufFix::None,
    }],
    config_keys: &[],
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
        ("ffn_norm", "post_attention_layernorm"),
        ("attn_q_norm", "self_attn.q_norm"),
        ("attn_k_norm", "self_attn.k_norm"),
    ],
};

/// PEFT's defaults for `qwen3` (`peft/utils/constants.py`).
const PEFT: PeftDefaults = PeftDefaults {
    lora: Some(&["q_proj", "v_proj"]),
    ia3: Some(&["q_proj", "v_proj", "down_proj"]),
    ia3_feedforward: Some(&["down_proj"]),
};

/// A Qwen3 with its head (`Qwen3ForCausalLM`, `Qwen3ForSequenceClassification`).
pub type Qwen3 = DecoderHeads<Qwen3Model>;

fn default_silu() -> String {
    "silu".into()
}
fn default_max_window_layers() -> usize {
    28
}

/// The keys beyond the decoder shape.
#[derive(Debug, Deserialize)]
struct Qwen3Keys {
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_silu")]
    hidden_act: String,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    use_sliding_window: bool,
    #[serde(default = "default_max_window_layers")]
    max_window_layers: usize,
}

/// A checked `Qwen3Config`.
#[derive(Debug, Clone)]
pub struct Qwen3Config {
    /// Sizes.
    pub shape: DecoderShape,
    /// The rotary embedding.
    pub rope: RopeConfig,
    /// Whether lm_head shares embed_tokens.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v/o.
    pub attention_bias: bool,
    /// The attention window of each layer (`None`: full attention).
    pub windows: Vec<Option<usize>>,
}

fn parse_config(_: &str, raw: &Value, file: &Path) -> Result<Arc<dyn ArchConfig>> {
    let mut shape: DecoderShape = parse_json(raw, file)?;
    // `Qwen3Config`'s default where the file names none (a GGUF file's metadata, whose mapping
    // in transformers reads no head size): 128, not hidden / heads.
    shape.head_dim.get_or_insert(128);
    shape.validate(file)?;
    let keys: Qwen3Keys = parse_json(raw, file)?;
    if keys.hidden_act != "silu" {
        return Err(unsupported(
            file,
            "hidden_act",
            format!("\"{}\"", keys.hidden_act),
            "Qwen3's MLP is implemented with silu",
        ));
    }
    let (block, key) = match (&keys.rope_scaling, &keys.rope_parameters) {
        (Some(s), _) if !s.is_null() => (Some(s), "rope_scaling"),
        (_, p) => (p.as_ref(), "rope_parameters"),
    };
    let rope = RopeConfig::parse(
        block,
        &RopeContext {
            file,
            key,
            theta: keys.rope_theta.unwrap_or(10000.0),
            head_dim: shape.head_size(),
            partial_rotary_factor: 1.0,
            max_position_embeddings: shape.max_position_embeddings,
        },
    )?;
    // `self.sliding_window = self.sliding_window if self.use_sliding_window else None`; the
    // layers from `max_window_layers` on slide unless `layer_types` says otherwise.
    let layers = shape.num_hidden_layers;
    let windows = match sliding_window(raw, file)?.filter(|_| keys.use_sliding_window) {
        Some(window) => layer_windows(raw, file, layers, Some(window), || {
            (0..layers)
                .map(|i| (i >= keys.max_window_layers).then_some(window))
                .collect()
        })?,
        None => vec![None; layers],
    };
    Ok(Arc::new(Qwen3Config {
        rope,
        tie_word_embeddings: keys.tie_word_embeddings,
        attention_bias: keys.attention_bias,
        windows,
        shape,
    }))
}

impl ArchConfig for Qwen3Config {
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
        let backbone = Qwen3Model::new(self, device);
        DecoderHeads::build(config, task, backbone, shape, weights, &[], device)
    }
}

/// Self-attention with a norm on every query and key head.
#[derive(Module, Debug, Adaptable)]
pub struct Qwen3Attention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub o_proj: Linear,
    /// RMSNorm over `head_dim` of each query head.
    pub q_norm: RmsNorm,
    /// RMSNorm over `head_dim` of each key head.
    pub k_norm: RmsNorm,
    #[module(skip)]
    attention: CausalAttention,
}

/// One decoder layer.
#[derive(Module, Debug, Adaptable)]
pub struct Qwen3DecoderLayer {
    /// Attention.
    pub self_attn: Qwen3Attention,
    /// SwiGLU MLP.
    pub mlp: GatedMlp,
    /// Pre-attention norm.
    pub input_layernorm: RmsNorm,
    /// Pre-MLP norm.
    pub post_attention_layernorm: RmsNorm,
}

/// The decoder stack (`model.` in checkpoints).
#[derive(Module, Debug, Adaptable)]
pub struct Qwen3Model {
    /// Token embeddings.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<Qwen3DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Attention key/value prefix site (prefix tuning).
    pub prompt_encoder: KvPrefix,
    #[module(skip)]
    rotary: Rotary,
}

impl Qwen3Attention {
    fn new(c: &Qwen3Config, window: Option<usize>, device: &Device) -> Self {
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
                scale: None,
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
        // The norms act on each head's `head_dim`: the same before or after the head transpose.
        let q = rms_norm(
            &self.q_norm,
            split_heads(self.q_proj.forward_in(x.clone(), fc), heads),
        );
        let k = rms_norm(
            &self.k_norm,
            split_heads(self.k_proj.forward_in(x.clone(), fc), kv_heads),
        );
        let v = split_heads(self.v_proj.forward_in(x, fc), kv_heads);
        let out = self.attention.attend(q, k, v, rope, mask, cache);
        self.o_proj.forward_in(out, fc)
    }
}

impl Qwen3Model {
    /// An uninitialized (lazy) model of this shape; load weights into it.
    pub fn new(c: &Qwen3Config, device: &Device) -> Self {
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
                .map(|window| Qwen3DecoderLayer {
                    self_attn: Qwen3Attention::new(c, *window, device),
                    mlp: GatedMlp::new(hidden, inter, false, Activation::Silu, device),
                    input_layernorm: norm(),
                    post_attention_layernorm: norm(),
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
            rotary: Rotary::new(&c.rope),
        }
    }
}

impl DecoderBackbone for Qwen3Model {
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
        let rope = self
            .rotary
            .tables(cache.as_deref(), packed.as_ref(), b, s, &input_ids.device());
        let mut h = self.embed_tokens.forward_in(input_ids, fc);
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = rms_norm(&layer.input_layernorm, h.clone());
            let layer_cache = cache.as_deref_mut().map(|c| (c, i));
            h = h + layer
                .self_attn
                .forward(normed, &rope, mask.as_ref(), layer_cache, fc);
            let normed = rms_norm(&layer.post_attention_layernorm, h.clone());
            h = h + layer.mlp.forward_in(normed, fc);
        }
        Ok(rms_norm(&self.norm, h))
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
        "Qwen3"
    }

    fn peft_defaults(&self) -> PeftDefaults {
        PEFT
    }
}
