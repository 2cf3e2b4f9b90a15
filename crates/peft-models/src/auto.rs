//! [`HfModel`]: any supported architecture with its task head, loaded from a folder or hub id.

use std::path::PathBuf;

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use peft_core::Adaptable;
use peft_core::nn::ForwardContext;

use crate::bert::{BertForSequenceClassification, BertModel};
use crate::cache::KvCache;
use crate::config::{HfConfig, ModelConfig};
use crate::error::{ModelError, Result};
use crate::gpt2::{Gpt2ForSequenceClassification, Gpt2LMHeadModel};
use crate::heads::mean_pool_normalize;
use crate::hub;
use crate::llama::{LlamaForCausalLM, LlamaForSequenceClassification};
use crate::load::{load_into, tensor_shapes, total_elements, weight_files};
use crate::names;
use crate::tokenizer::HfTokenizer;

/// Which head to put on the backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Task {
    /// Whatever `config.json`'s `architectures` names (encoder for a bare `BertModel`).
    #[default]
    Auto,
    /// Encoder outputs and sentence embeddings (BERT).
    Encoder,
    /// Next-token logits (GPT-2, Llama family).
    CausalLm,
    /// Sequence classification with this many labels (a head missing from the checkpoint is
    /// freshly initialized).
    SequenceClassification {
        /// Number of labels.
        num_labels: usize,
    },
}

/// A supported model with its head. Module paths are Hugging Face names, so PEFT
/// `target_modules` lists and bundles apply unchanged.
// Burn modules cannot be boxed, and a model is built once: the size difference is harmless.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug, Adaptable)]
pub enum HfModel {
    /// `BertModel`.
    Bert(BertModel),
    /// `BertForSequenceClassification`.
    BertForSequenceClassification(BertForSequenceClassification),
    /// `GPT2LMHeadModel`.
    Gpt2LMHeadModel(Gpt2LMHeadModel),
    /// `GPT2ForSequenceClassification`.
    Gpt2ForSequenceClassification(Gpt2ForSequenceClassification),
    /// `LlamaForCausalLM` (and Qwen2, Mistral).
    LlamaForCausalLM(LlamaForCausalLM),
    /// `LlamaForSequenceClassification` (and Qwen2, Mistral).
    LlamaForSequenceClassification(LlamaForSequenceClassification),
}

/// Model inputs: int64 `[batch, seq]` tensors.
#[derive(Debug, Clone)]
pub struct ModelInputs {
    /// Token ids.
    pub input_ids: Tensor<2, Int>,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Option<Tensor<2, Int>>,
    /// Segment ids (BERT).
    pub token_type_ids: Option<Tensor<2, Int>>,
}

/// What a forward produced (fields depend on the head).
#[derive(Debug, Clone, Default)]
pub struct ModelOutputs {
    /// Causal LM logits `[b, s, vocab]`.
    pub logits: Option<Tensor<3>>,
    /// Classification logits `[b, num_labels]`.
    pub class_logits: Option<Tensor<2>>,
    /// Encoder hidden states `[b, s, hidden]`.
    pub last_hidden_state: Option<Tensor<3>>,
    /// Mean-pooled, L2-normalised embedding `[b, hidden]`.
    pub sentence_embedding: Option<Tensor<2>>,
    /// BERT pooler output `[b, hidden]`.
    pub pooler_output: Option<Tensor<2>>,
}

impl HfModel {
    /// Run the model. Inputs it cannot take (token ids outside the vocabulary, a sequence
    /// longer than the position table, masks of another shape, an empty batch) are
    /// [`ModelError::InputOutOfRange`] naming the input, the limit and what to do; nothing
    /// panics on user input.
    pub fn forward(&self, inputs: &ModelInputs) -> Result<ModelOutputs> {
        self.forward_with(inputs, &ForwardContext::default())
    }

    /// [`forward`](Self::forward) with a per-call context: with
    /// [`ForwardContext::mixed`] each row runs its own adapter (PEFT's `adapter_names`), the
    /// frozen base once for the whole batch. Build the context with
    /// [`PeftModel::adapter_rows`](peft_core::PeftModel::adapter_rows), which checks the names.
    pub fn forward_with(&self, inputs: &ModelInputs, fc: &ForwardContext) -> Result<ModelOutputs> {
        let ids = inputs.input_ids.clone();
        let mask = inputs.attention_mask.clone();
        if let Some(rows) = fc.rows()
            && rows.batch() != ids.dims()[0]
        {
            return Err(ModelError::InputOutOfRange {
                input: "adapter_names".into(),
                found: format!("{} names", rows.batch()),
                limit: format!("the batch has {} rows", ids.dims()[0]),
                fix: "name one adapter (or `__base__`) per row".into(),
            });
        }
        Ok(match self {
            HfModel::Bert(m) => {
                let out =
                    m.forward_with(ids.clone(), mask.clone(), inputs.token_type_ids.clone(), fc)?;
                let full = mask.unwrap_or_else(|| ids.ones_like());
                ModelOutputs {
                    sentence_embedding: Some(mean_pool_normalize(
                        out.last_hidden_state.clone(),
                        &full,
                    )),
                    last_hidden_state: Some(out.last_hidden_state),
                    pooler_output: out.pooler_output,
                    ..Default::default()
                }
            }
            HfModel::BertForSequenceClassification(m) => ModelOutputs {
                class_logits: Some(m.forward_with(ids, mask, inputs.token_type_ids.clone(), fc)?),
                ..Default::default()
            },
            HfModel::Gpt2LMHeadModel(m) => ModelOutputs {
                logits: Some(m.forward_with(ids, mask, None, fc)?),
                ..Default::default()
            },
            HfModel::Gpt2ForSequenceClassification(m) => ModelOutputs {
                class_logits: Some(m.forward_with(ids, mask, fc)?),
                ..Default::default()
            },
            HfModel::LlamaForCausalLM(m) => ModelOutputs {
                logits: Some(m.forward_with(ids, mask, None, fc)?),
                ..Default::default()
            },
            HfModel::LlamaForSequenceClassification(m) => ModelOutputs {
                class_logits: Some(m.forward_with(ids, mask, fc)?),
                ..Default::default()
            },
        })
    }

    /// Causal LM logits with a KV cache; [`ModelError::InvalidInput`] if this is not a causal
    /// LM, and the input errors of [`forward`](Self::forward).
    pub fn forward_lm(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor<3>> {
        self.forward_lm_with(input_ids, attention_mask, cache, &ForwardContext::default())
    }

    /// [`forward_lm`](Self::forward_lm) with a per-call context (see
    /// [`forward_with`](Self::forward_with)).
    pub fn forward_lm_with(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        cache: Option<&mut KvCache>,
        fc: &ForwardContext,
    ) -> Result<Tensor<3>> {
        match self {
            HfModel::Gpt2LMHeadModel(m) => m.forward_with(input_ids, attention_mask, cache, fc),
            HfModel::LlamaForCausalLM(m) => m.forward_with(input_ids, attention_mask, cache, fc),
            _ => Err(ModelError::InvalidInput(
                "next-token logits need a causal LM (GPT-2, Llama, Qwen2, Mistral with an LM head)"
                    .into(),
            )),
        }
    }

    /// Rows of the token embedding table (the ids `input_ids` may hold).
    pub fn vocab_size(&self) -> usize {
        match self {
            HfModel::Bert(m) => m.embeddings.word_embeddings.dims()[0],
            HfModel::BertForSequenceClassification(m) => {
                m.bert.embeddings.word_embeddings.dims()[0]
            }
            HfModel::Gpt2LMHeadModel(m) => m.transformer.wte.dims()[0],
            HfModel::Gpt2ForSequenceClassification(m) => m.transformer.wte.dims()[0],
            HfModel::LlamaForCausalLM(m) => m.model.embed_tokens.dims()[0],
            HfModel::LlamaForSequenceClassification(m) => m.model.embed_tokens.dims()[0],
        }
    }

    /// The number of positions a learned position table allows (BERT's
    /// `max_position_embeddings`, GPT-2's `n_positions`) and its `config.json` key, prefix
    /// tokens included; `None` for RoPE models, which have no hard limit.
    pub fn position_limit(&self) -> Option<(usize, &'static str)> {
        match self {
            HfModel::Bert(m) => Some(m.embeddings.position_embeddings.dims()[0]),
            HfModel::BertForSequenceClassification(m) => {
                Some(m.bert.embeddings.position_embeddings.dims()[0])
            }
            HfModel::Gpt2LMHeadModel(m) => Some(m.transformer.wpe.dims()[0]),
            HfModel::Gpt2ForSequenceClassification(m) => Some(m.transformer.wpe.dims()[0]),
            HfModel::LlamaForCausalLM(_) | HfModel::LlamaForSequenceClassification(_) => None,
        }
        .map(|n| {
            let key = match self {
                HfModel::Bert(_) | HfModel::BertForSequenceClassification(_) => {
                    "max_position_embeddings"
                }
                _ => "n_positions",
            };
            (n, key)
        })
    }

    /// Positions the active prefix-tuning adapter takes in front of every sequence (0 without
    /// one).
    pub fn prefix_len(&self) -> usize {
        let prefix = match self {
            HfModel::Bert(m) => &m.prompt_encoder,
            HfModel::BertForSequenceClassification(m) => &m.bert.prompt_encoder,
            HfModel::Gpt2LMHeadModel(m) => &m.transformer.prompt_encoder,
            HfModel::Gpt2ForSequenceClassification(m) => &m.transformer.prompt_encoder,
            HfModel::LlamaForCausalLM(m) => &m.model.prompt_encoder,
            HfModel::LlamaForSequenceClassification(m) => &m.model.prompt_encoder,
        };
        prefix
            .past_key_values(1)
            .and_then(|kv| kv.first().map(|(k, _)| k.dims()[2]))
            .unwrap_or(0)
    }

    /// Check that sequences of `tokens` tokens fit this model (with its active prefix):
    /// [`ModelError::InputOutOfRange`] naming `what` (e.g. `data.max_length`) otherwise.
    pub fn check_sequence_length(&self, tokens: usize, what: &str) -> Result<()> {
        let Some((limit, key)) = self.position_limit() else {
            return Ok(());
        };
        let prefix = self.prefix_len();
        if tokens + prefix <= limit {
            return Ok(());
        }
        let room = limit.saturating_sub(prefix);
        Err(ModelError::InputOutOfRange {
            input: what.into(),
            found: if prefix > 0 {
                format!("{tokens} tokens plus a prefix of {prefix} virtual tokens")
            } else {
                format!("{tokens} tokens")
            },
            limit: format!("the model has {limit} positions (`{key}` in config.json)"),
            fix: format!("use at most {room} tokens"),
        })
    }

    /// Number of transformer layers.
    pub fn num_layers(&self) -> usize {
        match self {
            HfModel::Bert(m) => m.encoder.layer.len(),
            HfModel::BertForSequenceClassification(m) => m.bert.encoder.layer.len(),
            HfModel::Gpt2LMHeadModel(m) => m.transformer.h.len(),
            HfModel::Gpt2ForSequenceClassification(m) => m.transformer.h.len(),
            HfModel::LlamaForCausalLM(m) => m.model.layers.len(),
            HfModel::LlamaForSequenceClassification(m) => m.model.layers.len(),
        }
    }

    /// Whether this is a causal LM.
    pub fn is_causal_lm(&self) -> bool {
        matches!(
            self,
            HfModel::Gpt2LMHeadModel(_) | HfModel::LlamaForCausalLM(_)
        )
    }
}

/// A loaded model with its files.
#[derive(Debug)]
pub struct Pretrained {
    /// The model.
    pub model: HfModel,
    /// Its config.
    pub config: HfConfig,
    /// The folder its files came from.
    pub dir: PathBuf,
    /// The tokenizer, when the folder has `tokenizer.json`.
    pub tokenizer: Option<HfTokenizer>,
}

fn choose_task(config: &HfConfig, task: Task) -> Task {
    match task {
        Task::Auto if config.is_sequence_classifier() => Task::SequenceClassification {
            num_labels: config.num_labels.unwrap_or(2),
        },
        Task::Auto => match config.model {
            ModelConfig::Bert(_) => Task::Encoder,
            _ => Task::CausalLm,
        },
        other => other,
    }
}

/// Load a model from a folder or hub id (see [`hub::resolve`]) onto `device`.
pub fn from_pretrained(source: &str, task: Task, device: &Device) -> Result<Pretrained> {
    let dir = hub::resolve(source)?;
    let config = HfConfig::read(&dir.join("config.json"))?;
    let files = weight_files(&dir)?;
    let shapes = tensor_shapes(&files)?;
    // Sizes come from config.json; check them against what the weights hold before building
    // anything of that size.
    let (needed, held) = (config.min_parameters(), total_elements(&shapes));
    if needed > held {
        return Err(ModelError::InvalidConfig {
            file: config.file.clone(),
            reason: format!(
                "describes a model of at least {needed} parameters, but the weights ({}) hold \
                 {held}; this config.json does not belong to these weights",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    let names: std::collections::BTreeSet<String> = shapes.into_keys().collect();
    let task = choose_task(&config, task);
    let unsupported = |what: &str| ModelError::UnsupportedOption {
        file: config.file.clone(),
        key: "task".into(),
        found: what.into(),
        reason: format!("not available for model_type {}", config.model_type),
    };
    let owned = |prefixes: &[&str]| prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>();
    // Checkpoints of the bare backbone lack the task prefix (`bert.`, `transformer.`); detect it.
    let has_prefix = |p: &str| names.iter().any(|n| n.starts_with(p));
    let model = match (&config.model, task) {
        (ModelConfig::Bert(c), Task::Encoder) => {
            let remap = names::bert::encoder_renames();
            let pooler = names.iter().any(|n| n.contains("pooler.dense"));
            let mut m = BertModel::new(c, pooler, device);
            load_into(&mut m, &files, &remap, false, &[])?;
            HfModel::Bert(m)
        }
        (ModelConfig::Bert(c), Task::SequenceClassification { num_labels }) => {
            let remap = names::bert::classifier_renames(has_prefix(names::bert::PREFIX));
            let mut m = BertForSequenceClassification::new(c, num_labels, device);
            let new = owned(names::bert::CLASSIFIER_NEW);
            load_into(&mut m, &files, &remap, false, &new)?;
            HfModel::BertForSequenceClassification(m)
        }
        (ModelConfig::Gpt2(c), Task::CausalLm) => {
            let remap = names::gpt2::renames(has_prefix(names::gpt2::PREFIX));
            let mut m = Gpt2LMHeadModel::new(c, device);
            load_into(&mut m, &files, &remap, true, &[])?;
            HfModel::Gpt2LMHeadModel(m)
        }
        (ModelConfig::Gpt2(c), Task::SequenceClassification { num_labels }) => {
            let remap = names::gpt2::renames(has_prefix(names::gpt2::PREFIX));
            let pad = config.raw.get("pad_token_id").and_then(|v| v.as_i64());
            let mut m = Gpt2ForSequenceClassification::new(c, num_labels, pad, device);
            let new = owned(names::gpt2::CLASSIFIER_NEW);
            load_into(&mut m, &files, &remap, true, &new)?;
            HfModel::Gpt2ForSequenceClassification(m)
        }
        (ModelConfig::Llama(c), Task::CausalLm) => {
            let scaling = c.scaling(&config.file)?;
            let mut m = LlamaForCausalLM::new(c, &scaling, device);
            load_into(&mut m, &files, &names::llama::renames(), false, &[])?;
            HfModel::LlamaForCausalLM(m)
        }
        (ModelConfig::Llama(c), Task::SequenceClassification { num_labels }) => {
            let scaling = c.scaling(&config.file)?;
            let mut m = LlamaForSequenceClassification::new(c, &scaling, num_labels, device);
            let new = owned(names::llama::CLASSIFIER_NEW);
            load_into(&mut m, &files, &names::llama::renames(), false, &new)?;
            HfModel::LlamaForSequenceClassification(m)
        }
        (_, Task::Encoder) => return Err(unsupported("encoder")),
        (_, Task::CausalLm) => return Err(unsupported("causal-lm")),
        (_, Task::Auto) => unreachable!("resolved by choose_task"),
    };
    let tokenizer = if dir.join("tokenizer.json").is_file() {
        Some(HfTokenizer::from_dir(&dir)?)
    } else {
        None
    };
    Ok(Pretrained {
        model,
        config,
        dir,
        tokenizer,
    })
}

/// Load just the config of a model folder or hub id.
pub fn read_config(source: &str) -> Result<(PathBuf, HfConfig)> {
    let dir = hub::resolve(source)?;
    let config = HfConfig::read(&dir.join("config.json"))?;
    Ok((dir, config))
}

/// The folder of `source` (resolving hub ids through the cache).
pub fn model_dir(source: &str) -> Result<PathBuf> {
    hub::resolve(source)
}
