//! llama.cpp's GGUF files as models, read as transformers' GGUF loader reads them
//! (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`): the config from the metadata, the
//! tensors under Hugging Face names with the converter's changes undone, the tokenizer and chat
//! template from `tokenizer.*`. Unlike transformers, the weights stay in their block formats:
//! every linear layer and the token table multiply through peft-ops' quantized kernels, so a
//! 4-bit file costs about its size in memory.

mod export;
mod reader;
mod tokenizer;
mod weights;
mod writer;

use std::path::Path;

use burn::tensor::Device;
use serde_json::{Map, Value, json};

pub use export::{LoraPair, write_lora_adapter, write_merged};
pub use reader::{GgufFile, GgufTensor, GgufValue};
pub use tokenizer::{chat_template, special_tokens, tokenizer_from_gguf};
pub use writer::GgufWriter;

use crate::arch::{GgufArch, GgufSpec};
use crate::auto::{Pretrained, Task};
use crate::config::HfConfig;
use crate::error::Result;
use crate::registry::ARCHITECTURES;

/// Whether `source` names a GGUF file (`*.gguf`).
pub fn is_gguf(source: &str) -> bool {
    Path::new(source)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The metadata keys every family maps the same way (`GGUF_CONFIG_MAPPING`), under
/// `<architecture>.`.
const SHARED_KEYS: &[(&str, &str)] = &[
    ("context_length", "max_position_embeddings"),
    ("block_count", "num_hidden_layers"),
    ("feed_forward_length", "intermediate_size"),
    ("embedding_length", "hidden_size"),
    ("rope.freq_base", "rope_theta"),
    ("attention.head_count", "num_attention_heads"),
    ("attention.head_count_kv", "num_key_value_heads"),
    ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
    ("vocab_size", "vocab_size"),
];

/// The registered family that reads `general.architecture` = `arch`.
fn family(file: &GgufFile, arch: &str) -> Result<(&'static GgufSpec, &'static GgufArch)> {
    let mut known = Vec::new();
    for spec in ARCHITECTURES.iter().filter_map(|a| a.gguf) {
        for a in spec.architectures {
            if a.name == arch {
                return Ok((spec, a));
            }
            known.push(a.name);
        }
    }
    Err(file.error(format!(
        "GGUF architecture `{arch}` is not read here; read: {}",
        known.join(", ")
    )))
}

fn to_json(value: &GgufValue) -> Value {
    match value {
        GgufValue::UInt(v) => json!(v),
        GgufValue::Int(v) => json!(v),
        GgufValue::Float(v) => json!(v),
        GgufValue::Bool(v) => json!(v),
        GgufValue::String(v) => json!(v),
        GgufValue::Array(items) => Value::Array(items.iter().map(to_json).collect()),
    }
}

/// The `config.json` the file's metadata describes, as transformers builds it, and the family
/// that reads it.
pub fn config_json(file: &GgufFile) -> Result<(Value, &'static GgufSpec, &'static GgufArch)> {
    let arch = file
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .ok_or_else(|| file.error("no `general.architecture` in the metadata"))?
        .to_string();
    let (spec, family_arch) = family(file, &arch)?;
    let mut config = Map::new();
    // llama.cpp writes Mistral as `llama`; transformers reads it as `mistral` when
    // `general.name` is exactly that (`"mistral" in model_name`, a list of names).
    let name = file.get("general.name").and_then(GgufValue::as_str);
    let model_type = match (arch.as_str(), name) {
        ("llama", Some("mistral")) => "mistral",
        _ => family_arch.model_type,
    };
    config.insert("model_type".into(), json!(model_type));
    for (key, to) in SHARED_KEYS {
        if let Some(v) = file.get(&format!("{arch}.{key}")) {
            config.insert((*to).into(), to_json(v));
        }
    }
    for (key, to) in spec.config_keys {
        if let Some(v) = file.get(key) {
            config.insert((*to).into(), to_json(v));
        }
    }
    // llama.cpp rotates `rope.dimension_count` dimensions of each head
    // (`convert_hf_to_gguf.py` writes `partial_rotary_factor · head_dim` for Phi-3); fewer than
    // the head's is partial rotary. transformers' mapping drops the key, and with it Phi-3's
    // partial rotary, so a Phi-3 file would run with the wrong RoPE there.
    let get = |key: &str| {
        file.get(&format!("{arch}.{key}"))
            .and_then(GgufValue::as_u64)
    };
    if let (Some(rotated), Some(hidden), Some(heads)) = (
        get("rope.dimension_count"),
        get("embedding_length"),
        get("attention.head_count").filter(|h| *h > 0),
    ) {
        let head_dim = get("attention.key_length").unwrap_or(hidden / heads);
        if rotated > 0 && rotated < head_dim {
            config.insert(
                "partial_rotary_factor".into(),
                json!(rotated as f64 / head_dim as f64),
            );
        }
    }
    if !config.contains_key("vocab_size")
        && let Some(tokens) = file
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array)
    {
        config.insert("vocab_size".into(), json!(tokens.len()));
    }
    // llama.cpp stores the output projection only when it is not the embedding table.
    config.insert(
        "tie_word_embeddings".into(),
        json!(file.tensor("output.weight").is_none()),
    );
    for (key, to) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(v) = file.get(key) {
            config.insert(to.into(), to_json(v));
        }
    }
    Ok((Value::Object(config), spec, family_arch))
}

/// Load the GGUF file `path` with `task`'s head: its config, its weights (quantized ones stay
/// quantized), its tokenizer and chat template.
pub fn load(path: &Path, task: Task, device: &Device) -> Result<Pretrained> {
    let file = GgufFile::open(path)?;
    let (json, spec, arch) = config_json(&file)?;
    let config = HfConfig::from_value(json, path)?;
    // The weights are the file's: check the config against them before building anything.
    let held: u128 = file
        .tensors
        .iter()
        .map(|t| {
            t.dims
                .iter()
                .fold(1u128, |n, d| n.saturating_mul(*d as u128))
        })
        .fold(0u128, u128::saturating_add);
    if config.min_parameters() > held {
        return Err(file.error(format!(
            "the metadata describes a model of at least {} parameters, but the tensors hold \
             {held}; the file is inconsistent",
            config.min_parameters()
        )));
    }
    let task = config.resolve_task(task);
    let mut model = config.arch.build(&config, task, None, device)?;
    weights::fill(&mut model, &file, spec, arch, task, device)?;
    // A file without `tokenizer.*` (weights only) loads without a tokenizer, as a folder
    // without tokenizer.json does.
    let (tokenizer, special_tokens) = match file.get("tokenizer.ggml.model") {
        Some(_) => (Some(tokenizer_from_gguf(&file)?), special_tokens(&file)?),
        None => (None, Vec::new()),
    };
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(Pretrained {
        model,
        config,
        dir,
        tokenizer,
        gguf: Some(path.to_path_buf()),
        chat_template: chat_template(&file),
        special_tokens,
    })
}

/// The Hugging Face tokenizer files of the GGUF model `path`, for a model folder written from
/// it (`burn-peft merge` of a GGUF base): `tokenizer.json` (the tokenizer built from
/// `tokenizer.ggml.*`), `tokenizer_config.json` (the chat template and special tokens, as
/// transformers' GGUF loader sets them) and `generation_config.json` (bos / eos ids).
pub fn hf_tokenizer_files(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let file = GgufFile::open(path)?;
    let tokenizer = tokenizer_from_gguf(&file)?;
    let tokens = file
        .get("tokenizer.ggml.tokens")
        .and_then(GgufValue::as_array)
        .unwrap_or(&[]);
    let token = |key: &str| {
        let id = file.get(key)?.as_u64()?;
        tokens
            .get(usize::try_from(id).ok()?)?
            .as_str()
            .map(str::to_string)
    };
    let json_bytes = |value: &Value| {
        let mut text = serde_json::to_string_pretty(value).expect("JSON values render");
        text.push('\n');
        text.into_bytes()
    };
    let mut config = Map::new();
    // `tokenizer.json` holds the whole tokenizer; the fast class reads it as it is.
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    for (key, name) in [
        ("tokenizer.ggml.bos_token_id", "bos_token"),
        ("tokenizer.ggml.eos_token_id", "eos_token"),
        ("tokenizer.ggml.unknown_token_id", "unk_token"),
        ("tokenizer.ggml.padding_token_id", "pad_token"),
    ] {
        if let Some(t) = token(key) {
            config.insert(name.into(), json!(t));
        }
    }
    if let Some(template) = chat_template(&file) {
        config.insert("chat_template".into(), json!(template));
    }
    let mut generation = Map::new();
    for (key, name) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(v) = file.get(key) {
            generation.insert(name.into(), to_json(v));
        }
    }
    let tokenizer_json = tokenizer
        .inner()
        .to_string(true)
        .map_err(|e| file.error(format!("cannot write the tokenizer as tokenizer.json: {e}")))?;
    Ok(vec![
        ("tokenizer.json".into(), tokenizer_json.into_bytes()),
        (
            "tokenizer_config.json".into(),
            json_bytes(&Value::Object(config)),
        ),
        (
            "generation_config.json".into(),
            json_bytes(&Value::Object(generation)),
        ),
    ])
}
