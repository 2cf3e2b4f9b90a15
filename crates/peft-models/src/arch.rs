//! The architecture seam: everything a model family says about itself, said once, in the
//! family's own file, behind two traits.
//!
//! - [`Architecture`] (one `static` per family): the `model_type` values of `config.json` the
//!   family reads and how to parse and check that file into an [`ArchConfig`].
//! - [`ArchConfig`] (the parsed config): sizes for the checks made before anything is allocated,
//!   the default head, and how to build the model for a head and load its weights under
//!   Hugging Face names ([`Checkpoint`]).
//! - [`ArchModel`] (the built model, an enum of the family's heads): its forwards, sizes,
//!   prefix-tuning geometry, and its transformers class and checkpoint names for saving. Its
//!   `#[derive(Adaptable)]` names PEFT's default `target_modules` for it
//!   (`#[peft(default_targets = ...)]`, usually through [`PeftDefaults`]).
//!
//! `registry.rs` lists the families in one place; it generates [`HfModel`] (one variant per
//! family) and the table [`from_pretrained`](crate::from_pretrained) reads `model_type`
//! against. Nothing outside this crate names a family: the trainer, the server and the CLI
//! see [`HfModel`] through [`ArchModel`]'s methods.
//!
//! docs/architectures.md walks through a new family.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use burn_store::burn_pack::Tensor as PackTensor;
use peft_core::nn::{ForwardContext, KvPrefix};
use peft_core::{Adaptable, DefaultTargets};
use serde_json::Value;

use crate::auto::{HfModel, ModelInputs, ModelOutputs, Task};
use crate::cache::KvCache;
use crate::config::HfConfig;
use crate::error::{ModelError, Result};
use crate::load::load_into;

/// A model family: the `model_type` values its `config.json` may carry and the parser of that
/// file. One `static` per family, listed in `registry.rs`.
pub struct Architecture {
    /// `model_type` values this family reads (`["llama", "mistral", "qwen2"]`).
    pub model_types: &'static [&'static str],
    /// Parse and check `config.json` (the raw JSON, its `model_type`, and the file for
    /// errors). Every size and option is checked here, so building and running the model
    /// cannot fail on the config later.
    pub parse: fn(model_type: &str, raw: &Value, file: &Path) -> Result<Arc<dyn ArchConfig>>,
    /// How llama.cpp's GGUF files of the family read (`None`: the family has none).
    pub gguf: Option<&'static GgufSpec>,
}

/// How a family's llama.cpp GGUF files map onto its Hugging Face names, as transformers'
/// GGUF loader reads them (`modeling_gguf_pytorch_utils.py`, `integrations/ggml.py`'s
/// `GGUF_CONFIG_MAPPING`, gguf-py's `tensor_mapping.py`).
#[derive(Debug)]
pub struct GgufSpec {
    /// The `general.architecture` values (`llama`, `qwen2`, ...) the family reads. llama.cpp
    /// calls Mistral `llama`; a file whose `general.name` mentions mistral is read as
    /// `mistral`, as transformers does.
    pub architectures: &'static [GgufArch],
    /// `<arch>.<key>` metadata -> `config.json` key, beyond the ones every family shares
    /// (context length, block count, widths, heads, RoPE base, RMS epsilon, vocabulary).
    pub config_keys: &'static [(&'static str, &'static str)],
    /// Tensors outside the layers: `(gguf name, module path)` without `.weight` / `.bias`.
    pub globals: &'static [(&'static str, &'static str)],
    /// Tensors of layer `N` (`blk.N.<gguf>` -> `model.layers.N.<module>`).
    pub layer: &'static [(&'static str, &'static str)],
}

/// One `general.architecture` a family reads.
#[derive(Debug)]
pub struct GgufArch {
    /// llama.cpp's name.
    pub name: &'static str,
    /// The `model_type` it is read as.
    pub model_type: &'static str,
    /// What the converter changed that loading undoes.
    pub fix: GgufFix,
}

/// A change llama.cpp's converter makes to tensors, undone when a GGUF is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufFix {
    /// None.
    None,
    /// Llama: `attn_q` / `attn_k` rows are permuted for llama.cpp's interleaved RoPE
    /// (`convert_hf_to_gguf.py` `LlamaModel.permute`); transformers' `_reverse_permute_weights`
    /// undoes it.
    LlamaRopePermute,
    /// Gemma: every `*norm.weight` is stored as `1 + w`; transformers subtracts 1
    /// (`Gemma2TensorProcessor`).
    GemmaNormPlusOne,
}

/// A parsed, checked `config.json` of one family.
pub trait ArchConfig: Debug + Send + Sync {
    /// A lower bound of the backbone's parameter count (no biases, no head), saturating: a
    /// `config.json` whose bound exceeds what the weights hold does not belong to them, and
    /// building from it could ask for more memory than the machine has.
    fn min_parameters(&self) -> u128;

    /// Positions of a learned position table and the `config.json` key that sets it (BERT's
    /// `max_position_embeddings`, GPT-2's `n_positions`); `None` for rotary models, which
    /// have no hard limit.
    fn position_limit(&self) -> Option<(usize, &'static str)> {
        None
    }

    /// Channels of the images an image model reads (`pixel_values`); `None` for text models.
    fn image_channels(&self) -> Option<usize> {
        None
    }

    /// The head [`Task::Auto`] means when `architectures` names no sequence classifier: the
    /// encoder for encoders, the LM head for decoders.
    fn default_task(&self) -> Task {
        Task::CausalLm
    }

    /// Build the model with `task`'s head (never [`Task::Auto`]), its weights loaded from
    /// `weights` (a fresh classification head may be missing there), or lazily initialized
    /// without weights (random, for shapes alone, e.g. `burn-peft bench`). A head the family
    /// does not have is [`unsupported_task`].
    fn build(
        &self,
        config: &HfConfig,
        task: Task,
        weights: Option<&Checkpoint>,
        device: &Device,
    ) -> Result<HfModel>;
}

/// What the rest of the workspace asks of a built model, whatever its family. Implemented by
/// each family's model (an enum of its heads) and, delegating to those, by [`HfModel`].
pub trait ArchModel: Adaptable {
    /// Run the model (see [`HfModel::forward_with`]).
    fn forward_with(&self, inputs: &ModelInputs, fc: &ForwardContext) -> Result<ModelOutputs>;

    /// Next-token logits with a KV cache; [`not_a_causal_lm`] for other heads.
    fn forward_lm_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
        fc: &ForwardContext,
    ) -> Result<Tensor<3>>;

    /// Next-token logits `[b, 1, vocab]` of the last position only, with a KV cache: what
    /// generation reads. The default slices [`forward_lm_with`](Self::forward_lm_with)'s; the
    /// decoders apply the head to the last position alone (a prefill of `s` tokens then skips
    /// `s - 1` rows of `[hidden x vocab]` products).
    fn forward_lm_last_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
        fc: &ForwardContext,
    ) -> Result<Tensor<3>> {
        let logits = self.forward_lm_with(input_ids, attention_mask, cache, fc)?;
        let [b, s, v] = logits.dims();
        Ok(logits.slice([0..b, s - 1..s, 0..v]))
    }

    /// The final hidden states `[b, s, hidden]` of a causal LM and its head, for a loss taken
    /// over the vocabulary in chunks ([`LmHead`](crate::lm_head::LmHead)); `None` for other
    /// heads.
    fn lm_hidden_with(
        &self,
        inputs: &ModelInputs,
        fc: &ForwardContext,
    ) -> Result<Option<(Tensor<3>, crate::lm_head::LmHead<'_>)>> {
        let _ = (inputs, fc);
        Ok(None)
    }

    /// The head this model carries (never [`Task::Auto`]).
    fn task(&self) -> Task;

    /// Whether every token attends to every other (an encoder): then right padding never
    /// changes a row's outputs, and rows of any lengths batch together.
    fn attends_bidirectionally(&self) -> bool {
        false
    }

    /// Rows of the token embedding table (the ids `input_ids` may hold).
    fn vocab_size(&self) -> usize;

    /// See [`ArchConfig::position_limit`].
    fn position_limit(&self) -> Option<(usize, &'static str)> {
        None
    }

    /// The attention key/value prefix site (prefix tuning's geometry lives there).
    fn prompt_encoder(&self) -> &KvPrefix;

    /// Number of transformer layers.
    fn num_layers(&self) -> usize;

    /// The transformers class the model is (`Qwen3ForCausalLM`), written as `architectures`
    /// when the model is saved.
    fn hf_class(&self) -> String;

    /// Whether keys and values cached for `cached` positions cannot serve a forward that
    /// reaches `total` positions, so generation recomputes the whole sequence instead (Phi-3's
    /// LongRoPE changes its frequencies once a sequence passes the original context, and
    /// transformers' `Phi3ForCausalLM.prepare_inputs_for_generation` drops the cache there).
    fn cache_is_stale(&self, cached: usize, total: usize) -> bool {
        let _ = (cached, total);
        false
    }

    /// Whether the checkpoint stores tensor `name` (a module path) as Burn does, `[in, out]`
    /// (GPT-2's `Conv1D`), so neither loading nor saving transposes it.
    fn stored_as_in_out(&self, name: &str) -> bool {
        let _ = name;
        false
    }

    /// The tensors (module path, tensor) as transformers expects them in `model.safetensors`:
    /// renamed to checkpoint keys, with what the checkpoint stores beyond the module (a tied
    /// head transformers looks up under its own name). `source_dir` is the folder the model was
    /// loaded from, for families whose key style depends on it. By default the module paths are
    /// the checkpoint keys.
    fn to_checkpoint(
        &self,
        tensors: Vec<(String, PackTensor)>,
        source_dir: &Path,
    ) -> Vec<(String, PackTensor)> {
        let _ = source_dir;
        tensors
    }
}

/// PEFT's default targets of a model type as a family declares them (entries of
/// `peft/utils/constants.py`).
#[derive(Debug, Clone, Copy, Default)]
pub struct PeftDefaults {
    /// `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` (also LoRA's variants).
    pub lora: Option<&'static [&'static str]>,
    /// `TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING`.
    pub ia3: Option<&'static [&'static str]>,
    /// `TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING`.
    pub ia3_feedforward: Option<&'static [&'static str]>,
}

impl PeftDefaults {
    /// The entry of PEFT's mapping `table` (`"LORA"`, `"IA3"`).
    pub fn lookup(&self, table: &str) -> Option<DefaultTargets> {
        match table {
            "LORA" => self.lora.map(|t| DefaultTargets::new(t, &[])),
            "IA3" => self
                .ia3
                .map(|t| DefaultTargets::new(t, self.ia3_feedforward.unwrap_or(&[]))),
            _ => None,
        }
    }
}

/// The weights of a model folder: its safetensors files and the names they hold, read from
/// the headers.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The weight files (one, or the shards).
    pub files: Vec<PathBuf>,
    /// Every tensor name in them.
    pub names: BTreeSet<String>,
}

impl Checkpoint {
    /// Whether some tensor name starts with `prefix` (a task checkpoint's `bert.`).
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.names.iter().any(|n| n.starts_with(prefix))
    }

    /// Load the weights into `model`: `renames` rewrite checkpoint keys into module paths
    /// (regex, replacement), `in_out` says which tensors are stored `[in, out]` (not
    /// transposed), and module paths starting with one of `may_be_missing` (a new head) stay
    /// initialized with a warning. Any other missing or misshapen tensor is
    /// [`ModelError::Weights`].
    pub fn load<M: Module>(
        &self,
        model: &mut M,
        renames: &[KeyRename],
        in_out: fn(&str) -> bool,
        may_be_missing: &[&str],
    ) -> Result<()> {
        let missing: Vec<String> = may_be_missing.iter().map(|p| p.to_string()).collect();
        load_into(model, &self.files, renames, in_out, &missing)
    }
}

impl Checkpoint {
    /// `model` with the weights of `weights` loaded as [`load`](Self::load) does, or `model`
    /// as it is (lazily initialized) without weights.
    pub fn fill<M: Module>(
        weights: Option<&Self>,
        mut model: M,
        renames: &[KeyRename],
        in_out: fn(&str) -> bool,
        may_be_missing: &[&str],
    ) -> Result<M> {
        if let Some(weights) = weights {
            weights.load(&mut model, renames, in_out, may_be_missing)?;
        }
        Ok(model)
    }
}

/// A `(regex, replacement)` rewrite of checkpoint keys into module paths (burn-store's
/// `KeyRemapper` patterns).
pub type KeyRename = (String, String);

/// A [`KeyRename`].
pub fn rename(pattern: &str, replacement: &str) -> KeyRename {
    (pattern.to_string(), replacement.to_string())
}

/// The error of [`ArchConfig::build`] for a head the family does not have.
pub fn unsupported_task(config: &HfConfig, task: Task) -> ModelError {
    let found = match task {
        Task::Auto => "auto",
        Task::Encoder => "encoder",
        Task::CausalLm => "causal-lm",
        Task::SequenceClassification { .. } => "sequence-classification",
    };
    ModelError::UnsupportedOption {
        file: config.file.clone(),
        key: "task".into(),
        found: found.into(),
        reason: format!("not available for model_type {}", config.model_type),
    }
}

/// The error of [`ArchModel::forward_lm_with`] on a model without an LM head.
pub fn not_a_causal_lm(class: &str) -> ModelError {
    ModelError::InvalidInput(format!(
        "next-token logits need a causal LM, and this model is a {class}; load it with the \
         causal-lm task"
    ))
}

/// `a * b * ...` (saturating), for parameter counts of any size.
pub fn mul(parts: &[usize]) -> u128 {
    parts
        .iter()
        .fold(1u128, |n, p| n.saturating_mul(*p as u128))
}

/// `a + b + ...` (saturating).
pub fn sum(parts: &[u128]) -> u128 {
    parts.iter().fold(0u128, |a, b| a.saturating_add(*b))
}
