//! The YAML run config of `burn-peft train`: `model`, `method`, `data`, `train`, `output`,
//! `device`, `dtype`.
//!
//! `method` is either the string `full` (full fine-tuning, the baseline) or a block with the
//! keys of a PEFT `adapter_config.json` (`peft_type` picks the registered method), so a PEFT
//! adapter config pasted under `method:` is valid. Several methods train together (LoRA and
//! prefix tuning, ...) from a list under `method:` (adapters named after their `peft_type`) or a
//! `methods:` map of adapter name to block. Relative paths resolve against the folder of the
//! config file, so a config runs the same from any working directory.

use std::fmt;
use std::path::{Path, PathBuf};

use peft_core::PeftMethod;
use peft_core::bundle::{method_to_json, parse_config_value};
use peft_core::precision::BaseDType;
use peft_train::TrainConfig;
use peft_train::data::{DataConfig, TaskKind};
use peft_train::device::DeviceName;
use serde::Deserialize;
use serde_json::Value;

pub use lines::line_in_file;
use lines::{key_line, unknown_key_message, yaml_error};
use overrides::apply_sets;
pub use overrides::{SetValue, parse_set};

/// A config file that cannot be used; says where and what to do.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// The 1-based line, when known.
    pub line: Option<u64>,
    /// What is wrong (and what to do).
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// The whole run config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The base model.
    pub model: ModelSection,
    /// The PEFT method block, `full`, or a list of blocks trained together.
    #[serde(default)]
    pub method: Option<Value>,
    /// Several PEFT method blocks trained together, by adapter name.
    #[serde(default)]
    pub methods: Option<serde_json::Map<String, Value>>,
    /// The data files and how to read them.
    pub data: DataSection,
    /// Training hyper-parameters.
    #[serde(default)]
    pub train: TrainConfig,
    /// Output folder (adapter, best, checkpoints, TensorBoard runs); `train --output`
    /// replaces it (and is enough without it).
    #[serde(default)]
    pub output: PathBuf,
    /// `flex` (CPU), `cuda[:N]` or `vulkan[:N]`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Precision of the frozen base weights: `f32` (default), `f16` or `bf16`; adapters and
    /// optimizer state stay f32.
    #[serde(default)]
    pub dtype: BaseDType,
}

fn default_device() -> String {
    "flex".into()
}

/// The `model:` block.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Hub id (through the Hugging Face cache) or local folder.
    pub name_or_path: String,
    /// What the model learns.
    #[serde(default)]
    pub task: TaskKind,
    /// Classes (classification); default: the number of labels in `data.train`.
    pub num_labels: Option<usize>,
}

/// The `data:` block.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training file (JSONL or CSV); for an image model, an image folder (one subfolder per
    /// class) or a pixel CSV (`.csv` / `.csv.gz`, pixels then the label per row).
    pub train: PathBuf,
    /// Evaluated during training; picks the best adapter.
    pub eval: Option<PathBuf>,
    /// Held out: evaluated once at the end, with the best adapter.
    pub test: Option<PathBuf>,
    /// `jsonl` or `csv` (default: by extension).
    pub format: Option<String>,
    /// Field of the text.
    pub text_field: Option<String>,
    /// Field of the second text of a pair.
    pub text_pair_field: Option<String>,
    /// Field of the label.
    pub label_field: Option<String>,
    /// Field of the prompt (causal LM).
    pub prompt_field: Option<String>,
    /// Field of the completion (causal LM).
    pub completion_field: Option<String>,
    /// Field of a conversation (causal LM; default `messages`).
    pub messages_field: Option<String>,
    /// A Jinja chat template file for the conversations instead of the model's own (TRL's
    /// `chat_template_path`); it is saved with the adapter, so serving uses it too.
    pub chat_template: Option<PathBuf>,
    /// Conversations: loss on the assistant's tokens only (default true).
    pub assistant_only_loss: Option<bool>,
    /// A `messages` test set is also scored by generation (the base model's replies and the
    /// trained adapter's, exact and contains match): tokens per reply at most (default 32).
    pub max_new_tokens: Option<usize>,
    /// Most tokens per example.
    pub max_length: Option<usize>,
    /// Image models: the side images are resized to (default: the model's
    /// `preprocessor_config.json` size, else 224).
    pub image_size: Option<usize>,
    /// Image models reading a pixel CSV: a row's pixels, `[height, width]` or `[channels,
    /// height, width]` (default: square single-channel, e.g. MNIST's 784 = 28x28).
    pub image_shape: Option<Vec<usize>>,
    /// Causal LM: pack several short training examples into each row of `max_length` tokens
    /// (TRL's `packing`, best-fit decreasing), kept apart in attention and positions; default
    /// false.
    pub packing: Option<bool>,
}

impl DataSection {
    /// The reader settings.
    pub fn reader(&self) -> DataConfig {
        let d = DataConfig::default();
        DataConfig {
            format: self.format.clone(),
            text_field: self.text_field.clone().unwrap_or(d.text_field),
            text_pair_field: self.text_pair_field.clone().or(d.text_pair_field),
            label_field: self.label_field.clone().unwrap_or(d.label_field),
            prompt_field: self.prompt_field.clone().unwrap_or(d.prompt_field),
            completion_field: self.completion_field.clone().unwrap_or(d.completion_field),
            messages_field: self.messages_field.clone().unwrap_or(d.messages_field),
            assistant_only_loss: self.assistant_only_loss.unwrap_or(d.assistant_only_loss),
            max_length: self.max_length.unwrap_or(d.max_length),
            image_size: self.image_size,
            image_shape: self.image_shape.clone(),
        }
    }
}

/// What trains.
#[derive(Debug)]
pub enum MethodChoice {
    /// One or more registered PEFT methods, trained together, by adapter name (`default` for
    /// a single `method:` block).
    Peft(Vec<(String, Box<dyn PeftMethod>)>),
    /// Every parameter (full fine-tuning).
    Full,
    /// The classification head alone (a linear probe), the backbone frozen: `method: head`.
    Head,
}

/// A parsed, checked config with paths made absolute.
#[derive(Debug)]
pub struct LoadedRun {
    /// The config, with paths resolved.
    pub config: RunConfig,
    /// The method.
    pub method: MethodChoice,
}

/// `path` made absolute (against the working folder) with `.` and `..` removed, as runs print
/// and record their paths: `examples/../out/run` is `/…/out/run`.
pub fn normalized(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut out = PathBuf::new();
    for part in absolute.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Read, parse and check `file` as it is (no command-line overrides).
#[cfg(test)]
pub fn load(file: &Path) -> Result<LoadedRun, ConfigError> {
    load_with(file, None, &[])
}

/// Read, parse and check `file`; `output` (the command line's `--output`, relative to the
/// working folder) replaces the config's `output:`, and `--set` overrides apply over the file
/// (errors in an override name it).
pub fn load_with(
    file: &Path,
    output: Option<&Path>,
    sets: &[SetValue],
) -> Result<LoadedRun, ConfigError> {
    let err = |line: Option<u64>, message: String| ConfigError {
        file: file.to_path_buf(),
        line,
        message,
    };
    let text = std::fs::read_to_string(file).map_err(|e| {
        err(
            None,
            format!("cannot read the config: {e}; pass the path of a YAML file such as examples/lora-minilm-debian.yaml"),
        )
    })?;
    let mut config: RunConfig =
        serde_saphyr::from_str(&text).map_err(|e| yaml_error(file, &text, &e))?;
    if !sets.is_empty() {
        config = apply_sets(file, &text, sets)?;
    }
    let method = parse_methods(file, &text, &config)?;
    let base = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // `~/` is the user's home (the image demo reads data fetched into ~/.cache); other
    // relative paths are relative to the config file.
    let home = std::env::var_os("HOME");
    let resolve = |p: &mut PathBuf| {
        if let (Ok(rest), Some(home)) = (p.strip_prefix("~"), home.as_ref()) {
            *p = Path::new(home).join(rest);
        } else if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    match output {
        Some(out) => config.output = out.to_path_buf(),
        None if config.output.as_os_str().is_empty() => {
            return Err(err(
                None,
                "no output folder: add `output: out/my-run` to the config or pass --output DIR"
                    .into(),
            ));
        }
        None => resolve(&mut config.output),
    }
    resolve(&mut config.data.train);
    config.data.eval.as_mut().map(resolve);
    config.data.test.as_mut().map(resolve);
    config.data.chat_template.as_mut().map(resolve);
    for path in [&mut config.data.train, &mut config.output]
        .into_iter()
        .chain(config.data.eval.as_mut())
        .chain(config.data.test.as_mut())
        .chain(config.data.chat_template.as_mut())
    {
        *path = normalized(path);
    }
    // `~/` is the user's home (the shipped chat demo names the fetched GGUF file so).
    if let Some(rest) = config.model.name_or_path.strip_prefix("~/")
        && let Some(home) = std::env::var_os("HOME")
    {
        config.model.name_or_path = Path::new(&home).join(rest).to_string_lossy().into_owned();
    }
    // A local model folder or GGUF file given relative to the config; hub ids stay as they are.
    let local = base.join(&config.model.name_or_path);
    let is_local = local.join("config.json").is_file()
        || (peft_models::gguf::is_gguf(&config.model.name_or_path) && local.is_file())
        || (peft_models::load::is_pickle(Path::new(&config.model.name_or_path)) && local.is_file());
    if Path::new(&config.model.name_or_path).is_relative() && is_local {
        config.model.name_or_path = normalized(&local).to_string_lossy().into_owned();
    }
    if let Err((key, reason)) = config.train.validate() {
        // `adamw.eps` is the line of `eps:` inside the `train:` block.
        let leaf = key.rsplit('.').next().unwrap_or(&key);
        return Err(err(
            key_line(&text, Some("train"), leaf).or_else(|| key_line(&text, None, "train")),
            format!("`train.{key}` {reason}"),
        ));
    }
    let files = [
        ("train", Some(&config.data.train)),
        ("eval", config.data.eval.as_ref()),
        ("test", config.data.test.as_ref()),
        ("chat_template", config.data.chat_template.as_ref()),
    ];
    for (key, path) in files {
        // A data split may also be a folder: an image folder, for an image model.
        let folder_ok = key != "chat_template";
        if let Some(path) = path.filter(|p| !(p.is_file() || folder_ok && p.is_dir())) {
            return Err(err(
                key_line(&text, Some("data"), key),
                format!(
                    "`data.{key}`: {} {}; paths are relative to the config's folder",
                    path.display(),
                    if path.exists() {
                        "is not a file (nor an image folder)"
                    } else {
                        "does not exist"
                    }
                ),
            ));
        }
    }
    for (key, value) in [
        ("max_length", config.data.max_length),
        ("max_new_tokens", config.data.max_new_tokens),
    ] {
        if value == Some(0) {
            return Err(err(
                key_line(&text, Some("data"), key),
                format!("`data.{key}` must be at least 1"),
            ));
        }
    }
    if config.data.packing == Some(true) && config.model.task != TaskKind::CausalLm {
        return Err(err(
            key_line(&text, Some("data"), "packing"),
            "`data.packing` packs causal LM examples; a classifier reads one example per row: \
             remove it or set `model.task: causal-lm`"
                .into(),
        ));
    }
    if let Err(e) = config.device.parse::<DeviceName>() {
        return Err(err(key_line(&text, None, "device"), e.to_string()));
    }
    if config.dtype != BaseDType::F32 && matches!(method, MethodChoice::Full | MethodChoice::Head) {
        return Err(err(
            key_line(&text, None, "dtype"),
            peft_core::precision::PrecisionError::TrainedBase(config.dtype).to_string(),
        ));
    }
    Ok(LoadedRun { config, method })
}

/// What PEFT's task-specific wrappers do to a config before it is parsed: `task_type` from
/// `model.task` when absent. PEFT's rule for `SEQ_CLS` (the heads `classifier` and `score`
/// appended to `modules_to_save`, so the new head trains and is saved with the adapter) is
/// peft-core's, applied by `PeftModel::add_adapter`; with several methods only the first gets
/// the heads there (one classification head trains, saved with the first adapter).
fn with_task_defaults(mut method: Value, task: TaskKind) -> Value {
    let Value::Object(map) = &mut method else {
        return method;
    };
    // PEFT's enum values are upper case (`LORA`, `SEQ_CLS`); a YAML file may spell them
    // `lora` or `seq_cls`.
    for key in ["peft_type", "task_type"] {
        if let Some(Value::String(v)) = map.get_mut(key) {
            *v = v.to_ascii_uppercase();
        }
    }
    if !map.contains_key("task_type") {
        map.insert("task_type".into(), task.peft_task_type().into());
    }
    // A YAML file may name a single module to save as a string.
    if let Some(Value::String(one)) = map.get("modules_to_save") {
        let list = vec![Value::String(one.clone())];
        map.insert("modules_to_save".into(), Value::Array(list));
    }
    method
}

/// `method:` (one block, `full`, or a list) or `methods:` (adapter name -> block).
fn parse_methods(file: &Path, text: &str, config: &RunConfig) -> Result<MethodChoice, ConfigError> {
    let err = |line: Option<u64>, message: String| ConfigError {
        file: file.to_path_buf(),
        line,
        message,
    };
    let task = config.model.task;
    let blocks: Vec<(String, Value, &str)> = match (&config.method, &config.methods) {
        (Some(_), Some(_)) => {
            return Err(err(
                key_line(text, None, "methods"),
                "give `method` (one block, or a list) or `methods` (adapter name -> block), not both"
                    .into(),
            ));
        }
        (None, None) => {
            return Err(err(
                None,
                format!(
                    "missing `method`: a PEFT adapter config block with a `peft_type` (one of {}), a list of them, `full` (every parameter) or `head` (the classification head alone)",
                    peft_core::bundle::registered_methods().join(", ")
                ),
            ));
        }
        (Some(Value::String(s)), None) if s.eq_ignore_ascii_case("full") => {
            return Ok(MethodChoice::Full);
        }
        (Some(Value::String(s)), None) if s.eq_ignore_ascii_case("head") => {
            return Ok(MethodChoice::Head);
        }
        (Some(Value::Array(list)), None) => {
            let mut named = Vec::new();
            for block in list {
                let kind = block
                    .get("peft_type")
                    .and_then(Value::as_str)
                    .unwrap_or("method")
                    .to_ascii_lowercase();
                let taken = |n: &str| named.iter().any(|(m, _, _): &(String, Value, &str)| m == n);
                let mut name = kind.clone();
                let mut k = 2;
                while taken(&name) {
                    name = format!("{kind}_{k}");
                    k += 1;
                }
                named.push((name, block.clone(), "method"));
            }
            if named.is_empty() {
                return Err(err(
                    key_line(text, None, "method"),
                    "`method` is an empty list; give at least one method block".into(),
                ));
            }
            named
        }
        (Some(block), None) => vec![("default".into(), block.clone(), "method")],
        (None, Some(map)) => {
            if map.is_empty() {
                return Err(err(
                    key_line(text, None, "methods"),
                    "`methods` is empty; map adapter names to method blocks".into(),
                ));
            }
            map.iter()
                .map(|(name, block)| (name.clone(), block.clone(), "methods"))
                .collect()
        }
    };
    let mut out = Vec::with_capacity(blocks.len());
    for (name, block, section) in blocks {
        let block = with_task_defaults(block, task);
        out.push((name, parse_method(file, text, section, &block)?));
    }
    Ok(MethodChoice::Peft(out))
}

fn parse_method(
    file: &Path,
    text: &str,
    section: &str,
    value: &Value,
) -> Result<Box<dyn PeftMethod>, ConfigError> {
    let err = |line: Option<u64>, message: String| ConfigError {
        file: file.to_path_buf(),
        line,
        message,
    };
    let method_line = key_line(text, None, section);
    if !value.is_object() {
        return Err(err(
            method_line,
            format!(
                "`{section}` must be `full` or a PEFT adapter config block with a `peft_type` (one of {}); found {value}",
                peft_core::bundle::registered_methods().join(", ")
            ),
        ));
    }
    let loaded = parse_config_value(value.clone(), None).map_err(|e| {
        let key = match &e {
            peft_core::PeftError::InvalidConfig { key, .. } => Some(key.clone()),
            _ => None,
        };
        let line = key
            .as_deref()
            .and_then(|k| key_line(text, Some(section), k))
            .or_else(|| match e {
                peft_core::PeftError::UnknownPeftType { .. } => {
                    key_line(text, Some(section), "peft_type")
                }
                _ => None,
            })
            .or(method_line);
        err(line, format!("in `{section}`: {e}"))
    })?;
    if let Some(key) = loaded.unknown_keys.first() {
        let known: Vec<String> = match method_to_json(loaded.method.as_ref()) {
            Value::Object(m) => m.keys().cloned().collect(),
            _ => Vec::new(),
        };
        return Err(err(
            key_line(text, Some(section), key).or(method_line),
            format!(
                "in `{section}` ({}): {}",
                peft_core::peft_type_of(loaded.method.as_ref()),
                unknown_key_message(key, &known)
            ),
        ));
    }
    Ok(loaded.method)
}

mod lines;
mod overrides;
#[cfg(test)]
mod tests;
