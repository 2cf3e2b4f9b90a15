//! Phi-3 (`phi3`; Phi-3, Phi-3.5 and Phi-4-mini): fused `qkv_proj` (rows q, then k, then v) and
//! `gate_up_proj` (the gate half first), which PEFT targets as they are; partial rotary
//! (`partial_rotary_factor`: only the first dimensions of each head rotate); LongRoPE scaling
//! (`longrope`, the legacy `su`), whose long factors apply once a sequence passes
//! `original_max_position_embeddings`; an optional sliding window on every layer.
//! transformers' `models/phi3/modeling_phi3.py` and `configuration_phi3.py`.

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
    self, CausalAttention, DecoderBackbone, DecoderHeads, DecoderShape, HeadShape, sliding_window,
};
use crate::error::Result;
use crate::ops::split_heads;
use crate::rope::{Rope, RopeConfig, RopeContext, RopeScaling, Rotary};

/// The family's registration: `phi3`.
pub static ARCHITECTURE: Architecture = Architecture {
    model_types: &["phi3"],
    parse: parse_config,
    gguf: Some(&GGUF),
};

/// llama.cpp's `phi3` files (gguf-py's tensor names: the fused projections keep theirs).
static GGUF: GgufSpec = GgufSpec {
    architectures: &[GgufArch {
        name: "phi3",
        model_type: "phi3",
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
        ("attn_qkv", "self_attn.qkv_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_norm", "post_attention_layernorm"),
        ("ffn_up", "mlp.gate_up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ],
};

/// A Phi-3 with its head (`Phi3ForCausalLM`, `Phi3ForSequenceClassification`).
pub type Phi3 = DecoderHeads<Phi3Model>;

fn default_eps() -> f64 {
    1e-5
}
fn default_silu() -> String {
    "silu".into()
}
fn default_partial() -> f64 {
    1.0
}

/// `Phi3Config`'s keys beyond the decoder shape, with its defaults.
#[derive(Debug, Deserialize)]
struct Phi3Keys {
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<Value>,
    #[serde(default)]
    rope_parameters: Option<Value>,
    #[serde(default = "default_partial")]
    partial_rotary_factor: f64,
    #[serde(default)]
    original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default = "default_silu")]
    hidden_act: String,
}

/// A checked `Phi3Config`.
#[derive(Debug, Clone)]
pub struct Phi3Config {
    /// Sizes.
    pub shape: DecoderShape,
    /// The rotary embedding (partial, possibly LongRoPE).
    pub rope: RopeConfig,
    /// Whether lm_head shares embed_tokens.
    pub tie_word_embeddings: bool,
    /// `sliding_window` (every layer), `None` for full attention.
    pub window: Option<usize>,
}

fn parse_config(_: &str, raw: &Value, file: &Path) -> Result<Arc<dyn ArchConfig>> {
    let mut shape: DecoderShape = parse_json(raw, file)?;
    let keys: Phi3Keys = parse_json(raw, file)?;
    // Phi-3's RMSNorm epsilon defaults to 1e-5 (the shared shape's default is 1e-6).
    shape.rms_norm_eps = keys.rms_norm_eps;
    shape.validate(file)?;
    if keys.hidden_act != "silu" {
        return Err(unsupported(
            file,
            "hidden_act",
            format!("\"{}\"", keys.hidden_act),
            "Phi-3's MLP is implemented with silu",
        ));
    }
    let (block, key) = match (&keys.rope_scaling, &keys.rope_parameters) {
        (Some(s), _) if !s.is_null() => (Some(s.clone()), "rope_scaling"),
        (_, p) => (p.clone(), "rope_parameters"),
    };
    // The legacy type `su` is LongRoPE, and a top-level `original_max_position_embeddings`
    // wins over the block's (transformers' `Phi3Config` and `modeling_rope_utils.py`).
    let block = block.map(|mut b| {
        if let Some(map) = b.as_object_mut() {
            for key in ["rope_type", "type"] {
                if map.get(key).and_then(Value::as_str) == Some("su") {
                    map.insert(key.into(), Value::String("longrope".into()));
                }
            }
            if let Some(original) = keys.original_max_position_embeddings {
                map.insert("original_max_position_embeddings".into(), original.into());
            }
        }
        b
    });
    let rope = RopeConfig::parse(
        block.as_ref(),
        &RopeContext {
            file,
            key,
            theta: keys.rope_theta.unwrap_or(10000.0),
            head_dim: shape.head_size(),
            partial_rotary_factor: keys.partial_rotary_factor,
            max_position_embeddings: shape.max_position_embeddings,
        },
    )?;
    Ok(Arc::new(Phi3Config {
        rope,
        tie_word_embeddings: keys.tie_word_embeddings,
        window: sliding_window(raw, file)?,
        shape,
    }))
}

impl ArchConfig for Phi3Config {
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
        let backbone = Phi3Model::new(self, device);
        DecoderHeads::build(config, task, backbone, shape, weights, &[], device)
    }
}

/// Self-attention with the fused q/k/v projection.
#[derive(Module, Debug, Adaptable)]
pub struct Phi3Attention {
    /// Output projection.
    pub o_proj: Linear,
    /// Fused q/k/v projection: `[hidden] -> [(heads + 2 * kv_heads) * head_dim]`.
    pub qkv_proj: Linear,
    #[module(skip)]
    attention: CausalAttention,
}

/// The MLP with the fused gate and up projection.
#[derive(Module, Debug, Adaptable)]
pub struct Phi3Mlp {
    /// `[hidden] -> [2 * intermediate]`: the gate, then the up projection.
    pub gate_up_proj: Linear,
    /// Down projection.
    pub down_proj: Linear,
}

/// One decoder layer.
#[derive(Module, Debug, Adaptable)]
pub struct Phi3DecoderLayer {
    /// Attention.
    pub self_attn: Phi3Attention,
    /// MLP.
    pub mlp: Phi3Mlp,
    /// Pre-attention norm.
    pub input_layernorm: RmsNorm,
    /// Pre-MLP norm.
    pub post_attention_layernorm: RmsNorm,
}

/// The decoder stack (`model.` in checkpoints).
#[derive(Module, Debug, Adaptable)]
pub struct Phi3Model {
    /// Token embeddings.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<Phi3DecoderLayer>,
    /// Final norm.
    pub norm: RmsNorm,
    /// Attention key/value prefix site (prefix tuning).
    pub prompt_encoder: KvPrefix,
    #[module(skip)]
    rotary: Rotary,
    /// LongRoPE's original context, past which the frequencies change.
    #[module(skip)]
    long_rope_from: Option<usize>,
}

impl Phi3Attention {
    fn new(c: &Phi3Config, device: &Device) -> Self {
        let shape = &c.shape;
        let (h, kv, d) = (shape.num_attention_heads, shape.kv_heads(), shape.head_size());
        Self {
            o_proj: LinearConfig::new(h * d, shape.hidden_size)
                .with_bias(false)
                .init(device),
            qkv_proj: LinearConfig::new(shape.hidden_size, (h + 2 * kv) * d)
                .with_bias(false)
                .init(device),
            attention: CausalAttention {
                heads: h,
                kv_heads: kv,
                window: c.window,
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
        let qkv = self.qkv_proj.forward_in(x, fc);
        let d = qkv.dims()[2] / (heads + 2 * kv_heads);
        let (q_len, kv_len) = (heads * d, kv_heads * d);
        let q = split_heads(qkv.clone().narrow(2, 0, q_len), heads);
        let k = split_heads(qkv.clone().narrow(2, q_len, kv_len), kv_heads);
        let v = split_heads(qkv.narrow(2, q_len + kv_len, kv_len), kv_heads);
        let out = self.attention.attend(q, k, v, rope, mask, cache);
        self.o_proj.forward_in(out, fc)
    }
}

impl Phi3Mlp {
    fn forward(&self, x: Tensor<3>, fc: &ForwardContext) -> Tensor<3> {
        let gate_up = self.gate_up_proj.forward_in(x, fc);
        let half = gate_up.dims()[2] / 2;
        // `gate, up_states = up_states.chunk(2, dim=-1)`; `up_states * act(gate)`.
        let gate = gate_up.clone().narrow(2, 0, half);
        let up = gate_up.narrow(2, half, half);
        self.down_proj.forward_in(peft_ops::swiglu(gate, up), fc)
    }
}

impl Phi3Model {
    /// An uninitialized (lazy) model of this shape; load weights into it.
    pub fn new(c: &Phi3Config, device: &Device) -> Self {
        let shape = &c.shape;
        let norm = || {
            RmsNormConfig::new(shape.hidden_size)
                .with_epsilon(shape.rms_norm_eps)
                .init(device)
        };
        let (hidden, inter) = (shape.hidden_size, shape.intermediate_size);
        let linear = |i: usize, o: usize| LinearConfig::new(i, o).with_bias(false).init(device);
        Self {
            embed_tokens: EmbeddingConfig::new(shape.vocab_size, hidden).init(device),
            layers: (0..shape.num_hidden_layers)
                .map(|_| Phi3DecoderLayer {
                    self_attn: Phi3Attention::new(c, device),
                    mlp: Phi3Mlp {
                        gate_up_proj: linear(hidden, 2 * inter),
                        down_proj: linear(inter, hidden),
                    },
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
            long_rope_from: match &c.rope.scaling {
                RopeScaling::LongRope {
                    original_max_position_embeddings,
                    ..
                } => Some(*original_max_position_embeddings),
                _ => None,
            },
        }
    }
}

impl DecoderBackbone for Phi3Model {
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
            h = h + layer.mlp.forward(normed, fc);
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
        "Phi3"
    }

    fn peft_defaults(&self) -> PeftDefaults {
        // PEFT 0.21.2 has no `phi3` entry in its mappings: a config must name its targets.
        PeftDefaults::default()
    }

    fn cache_is_stale(&self, cached: usize, total: usize) -> bool {
        // `Phi3ForCausalLM.prepare_inputs_for_generation`: with LongRoPE, a sequence reaching
        // `original_max_position_embeddings + 1` tokens drops a cache of at most that many.
        self.long_rope_from
            .is_some_and(|original| total > original && cached <= original)
    }
}
