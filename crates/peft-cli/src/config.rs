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
use peft_core::matching::edit_distance;
use peft_core::precision::BaseDType;
use peft_train::TrainConfig;
use peft_train::data::{DataConfig, TaskKind};
use peft_train::device::DeviceName;
use serde::Deserialize;
use serde_json::Value;

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
    /// Output folder (adapter, best, checkpoints, TensorBoard runs).
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
    pub task: TaskName,
    /// Classes (classification); default: the number of labels in `data.train`.
    pub num_labels: Option<usize>,
}

/// The `model.task` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskName {
    /// Sequence classification.
    #[default]
    Classification,
    /// Causal language modelling.
    CausalLm,
}

impl TaskName {
    /// The data reader's task.
    pub fn kind(self) -> TaskKind {
        match self {
            Self::Classification => TaskKind::Classification,
            Self::CausalLm => TaskKind::CausalLm,
        }
    }
}

/// The `data:` block.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training file (JSONL or CSV).
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
    /// Most tokens per example.
    pub max_length: Option<usize>,
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
            max_length: self.max_length.unwrap_or(d.max_length),
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
}

/// A parsed, checked config with paths made absolute.
#[derive(Debug)]
pub struct LoadedRun {
    /// The config, with paths resolved.
    pub config: RunConfig,
    /// The method.
    pub method: MethodChoice,
}

/// Read, parse and check `file`.
pub fn load(file: &Path) -> Result<LoadedRun, ConfigError> {
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
    let mut config: RunConfig = serde_saphyr::from_str(&text).map_err(|e| yaml_error(file, &e))?;
    let method = parse_methods(file, &text, &config)?;
    let base = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let resolve = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    resolve(&mut config.data.train);
    config.data.eval.as_mut().map(resolve);
    config.data.test.as_mut().map(resolve);
    resolve(&mut config.output);
    // A local model folder given relative to the config; hub ids stay as they are.
    let local = base.join(&config.model.name_or_path);
    if Path::new(&config.model.name_or_path).is_relative() && local.join("config.json").is_file() {
        config.model.name_or_path = local.to_string_lossy().into_owned();
    }
    if let Err(e) = config.device.parse::<DeviceName>() {
        return Err(err(key_line(&text, None, "device"), e.to_string()));
    }
    if config.dtype != BaseDType::F32 && matches!(method, MethodChoice::Full) {
        return Err(err(
            key_line(&text, None, "dtype"),
            peft_core::precision::PrecisionError::TrainedBase(config.dtype).to_string(),
        ));
    }
    Ok(LoadedRun { config, method })
}

fn yaml_error(file: &Path, e: &serde_saphyr::Error) -> ConfigError {
    let line = e.location().map(|l| l.line()).filter(|l| *l > 0);
    // The library's text starts with "error: line L column C: " and may add a snippet; keep the
    // message itself, and turn serde's unknown-field message into ours (with a suggestion).
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    let message = match first
        .find("column ")
        .and_then(|i| first[i..].find(": ").map(|j| i + j + 2))
    {
        Some(start) => &first[start..],
        None => first.trim_start_matches("error: "),
    };
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once("`, expected one of "));
    let message = match unknown {
        Some((field, expected)) => {
            let expected: Vec<String> = expected.split(", ").map(str::to_string).collect();
            unknown_key_message(field, &expected)
        }
        None => message.to_string(),
    };
    ConfigError {
        file: file.to_path_buf(),
        line,
        message,
    }
}

/// "unknown key `x`; did you mean `y`? Valid keys: …".
fn unknown_key_message(found: &str, expected: &[String]) -> String {
    let mut best: Vec<(usize, &String)> = expected
        .iter()
        .map(|k| (edit_distance(found, k), k))
        .filter(|(d, k)| *d <= (k.len().max(found.len()) / 2).max(2))
        .collect();
    best.sort();
    let hint = best
        .first()
        .map(|(_, k)| format!("; did you mean `{k}`?"))
        .unwrap_or_default();
    format!(
        "unknown key `{found}`{hint} Valid keys here: {}",
        expected.join(", ")
    )
}

/// The 1-based line of `key:` in the top-level `section:` block (or at top level).
fn key_line(text: &str, section: Option<&str>, key: &str) -> Option<u64> {
    let mut inside = section.is_none();
    for (i, line) in text.lines().enumerate() {
        let indented = line.starts_with(' ') || line.starts_with('\t');
        let trimmed = line.trim_start();
        if !indented && !trimmed.is_empty() && !trimmed.starts_with('#') {
            inside = match section {
                Some(s) => trimmed.starts_with(&format!("{s}:")),
                None => true,
            };
            if section.is_none() && trimmed.starts_with(&format!("{key}:")) {
                return Some(i as u64 + 1);
            }
            continue;
        }
        if inside && section.is_some() && indented {
            let bare = trimmed.trim_start_matches(['"', '\'']);
            if bare.starts_with(key)
                && bare[key.len()..]
                    .trim_start_matches(['"', '\''])
                    .starts_with(':')
            {
                return Some(i as u64 + 1);
            }
        }
    }
    None
}

/// What PEFT's task-specific wrappers do to a config: `task_type` from `model.task` when absent,
/// and for `SEQ_CLS` the heads `classifier` and `score` appended to `modules_to_save` (PEFT's
/// `PeftModelForSequenceClassification`), so the new head trains and is saved with the adapter.
///
/// With several methods only the first gets the heads: one classification head trains, saved
/// with the first adapter (two copies of one head would each see only part of the training).
fn with_task_defaults(mut method: Value, task: TaskName, heads: bool) -> Value {
    let Value::Object(map) = &mut method else {
        return method;
    };
    if !map.contains_key("task_type") {
        let name = match task {
            TaskName::Classification => "SEQ_CLS",
            TaskName::CausalLm => "CAUSAL_LM",
        };
        map.insert("task_type".into(), Value::String(name.into()));
    }
    if heads && map.get("task_type").and_then(Value::as_str) == Some("SEQ_CLS") {
        let mut list: Vec<Value> = match map.get("modules_to_save") {
            Some(Value::Array(a)) => a.clone(),
            Some(Value::String(s)) => vec![Value::String(s.clone())],
            _ => Vec::new(),
        };
        for head in ["classifier", "score"] {
            if !list.iter().any(|v| v.as_str() == Some(head)) {
                list.push(Value::String(head.into()));
            }
        }
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
                    "missing `method`: a PEFT adapter config block with a `peft_type` (one of {}), a list of them, or `full`",
                    peft_core::bundle::registered_methods().join(", ")
                ),
            ));
        }
        (Some(Value::String(s)), None) if s.eq_ignore_ascii_case("full") => {
            return Ok(MethodChoice::Full);
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
    for (i, (name, block, section)) in blocks.into_iter().enumerate() {
        let block = with_task_defaults(block, task, i == 0);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<LoadedRun, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.yaml");
        std::fs::write(&file, yaml).unwrap();
        load(&file)
    }

    const GOOD: &str = "model:\n  name_or_path: some/model\nmethod:\n  peft_type: LORA\n  r: 4\n  target_modules: [query]\ndata:\n  train: d/train.jsonl\n  max_length: 32\ntrain:\n  epochs: 1\noutput: out\n";

    #[test]
    fn parses_a_lora_run_and_resolves_paths() {
        let run = parse(GOOD).unwrap();
        let MethodChoice::Peft(methods) = &run.method else {
            panic!("expected a PEFT method")
        };
        let [(name, m)] = methods.as_slice() else {
            panic!("one method")
        };
        assert_eq!(name, "default");
        assert_eq!(peft_core::peft_type_of(m.as_ref()), "LORA");
        assert!(run.config.data.train.ends_with("d/train.jsonl"));
        assert!(run.config.data.train.is_absolute() || run.config.data.train.starts_with("/"));
        assert_eq!(run.config.train.epochs, 1);
        assert_eq!(run.config.data.reader().max_length, 32);
        assert_eq!(run.config.device, "flex");
    }

    #[test]
    fn unknown_top_level_key_names_line_and_suggestion() {
        let e = parse(&GOOD.replace("train:\n  epochs", "trian:\n  epochs")).unwrap_err();
        assert_eq!(e.line, Some(10), "{e}");
        assert!(e.message.contains("did you mean `train`"), "{e}");
    }

    #[test]
    fn unknown_nested_key_names_line_and_suggestion() {
        let e = parse(&GOOD.replace("epochs: 1", "epohcs: 1")).unwrap_err();
        assert_eq!(e.line, Some(11), "{e}");
        assert!(e.message.contains("did you mean `epochs`"), "{e}");
    }

    #[test]
    fn unknown_method_key_names_line_and_suggestion() {
        let e = parse(&GOOD.replace("r: 4", "r: 4\n  lora_alfa: 8")).unwrap_err();
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.message.contains("did you mean `lora_alpha`"), "{e}");
    }

    #[test]
    fn unknown_peft_type_lists_registered_methods() {
        let e = parse(&GOOD.replace("peft_type: LORA", "peft_type: LORRA")).unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(
            e.message.contains("LORA") && e.message.contains("PREFIX_TUNING"),
            "{e}"
        );
    }

    #[test]
    fn full_fine_tuning_and_bad_device() {
        let full = GOOD.replace(
            "method:\n  peft_type: LORA\n  r: 4\n  target_modules: [query]\n",
            "method: full\n",
        );
        assert!(matches!(parse(&full).unwrap().method, MethodChoice::Full));
        let e = parse(&format!("{GOOD}device: tpu\n")).unwrap_err();
        assert_eq!(e.line, Some(13), "{e}");
        assert!(e.message.contains("vulkan:N"), "{e}");
    }

    #[test]
    fn device_and_dtype_keys() {
        let run = parse(&format!("{GOOD}device: vulkan:1\ndtype: bf16\n")).unwrap();
        assert_eq!(run.config.device, "vulkan:1");
        assert_eq!(run.config.dtype, BaseDType::BF16);
        assert_eq!(parse(GOOD).unwrap().config.dtype, BaseDType::F32);
        let e = parse(&format!("{GOOD}dtype: f8\n")).unwrap_err();
        assert_eq!(e.line, Some(13), "{e}");
        let full = GOOD.replace(
            "method:\n  peft_type: LORA\n  r: 4\n  target_modules: [query]\n",
            "method: full\n",
        );
        let e = parse(&format!("{full}dtype: f16\n")).unwrap_err();
        assert!(e.message.contains("full fine-tuning"), "{e}");
    }

    #[test]
    fn every_shipped_example_config_parses() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&examples).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let run = load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(run.config.data.train.is_file(), "{}", path.display());
                seen += 1;
            }
        }
        assert!(seen >= 5, "expected the five shipped configs, found {seen}");
    }

    #[test]
    fn classification_runs_get_peft_task_defaults() {
        let run = parse(GOOD).unwrap();
        let MethodChoice::Peft(methods) = &run.method else {
            panic!("expected a PEFT method")
        };
        let json = method_to_json(methods[0].1.as_ref());
        assert_eq!(json["task_type"], "SEQ_CLS");
        assert_eq!(
            json["modules_to_save"],
            serde_json::json!(["classifier", "score"])
        );
    }

    #[test]
    fn bad_value_type_has_a_line() {
        let e = parse(&GOOD.replace("epochs: 1", "epochs: many")).unwrap_err();
        assert_eq!(e.line, Some(11), "{e}");
    }

    #[test]
    fn several_methods_from_a_list_or_a_map_train_together() {
        let list = GOOD.replace(
            "method:\n  peft_type: LORA\n  r: 4\n  target_modules: [query]\n",
            "method:\n  - peft_type: LORA\n    r: 4\n    target_modules: [query]\n  - peft_type: PREFIX_TUNING\n    num_virtual_tokens: 8\n  - peft_type: LORA\n    r: 2\n    target_modules: [value]\n",
        );
        let run = parse(&list).unwrap();
        let MethodChoice::Peft(methods) = &run.method else {
            panic!("expected PEFT methods")
        };
        let names: Vec<&str> = methods.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["lora", "prefix_tuning", "lora_2"]);
        // Only the first block gets the SEQ_CLS heads: one head trains.
        let saved = |i: usize| method_to_json(methods[i].1.as_ref())["modules_to_save"].clone();
        assert_eq!(saved(0), serde_json::json!(["classifier", "score"]));
        assert!(
            saved(1).is_null() || saved(1) == serde_json::json!([]),
            "{}",
            saved(1)
        );
        assert_eq!(
            method_to_json(methods[1].1.as_ref())["task_type"],
            "SEQ_CLS"
        );

        let map = GOOD.replace(
            "method:\n  peft_type: LORA\n  r: 4\n  target_modules: [query]\n",
            "methods:\n  sql:\n    peft_type: LORA\n    r: 4\n    target_modules: [query]\n  style:\n    peft_type: PREFIX_TUNING\n    num_virtual_tokens: 4\n",
        );
        let run = parse(&map).unwrap();
        let MethodChoice::Peft(methods) = &run.method else {
            panic!("expected PEFT methods")
        };
        let names: Vec<&str> = methods.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["sql", "style"]);

        let typo = map.replace("num_virtual_tokens: 4", "num_virtual_token: 4");
        let e = parse(&typo).unwrap_err();
        assert!(
            e.message.contains("in `methods`") && e.message.contains("num_virtual_tokens"),
            "{e}"
        );
        let both = format!("{GOOD}methods:\n  a:\n    peft_type: LORA\n");
        let e = parse(&both).unwrap_err();
        assert!(e.message.contains("not both"), "{e}");
        let none = GOOD.replace(
            "method:\n  peft_type: LORA\n  r: 4\n  target_modules: [query]\n",
            "",
        );
        assert!(
            parse(&none)
                .unwrap_err()
                .message
                .contains("missing `method`")
        );
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn shipped() -> Vec<String> {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
            let mut texts: Vec<String> = std::fs::read_dir(dir)
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
                .map(|p| std::fs::read_to_string(p).unwrap())
                .collect();
            texts.sort();
            texts.push(GOOD.to_string());
            texts
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

            /// Random bytes and random edits of the shipped configs (byte flips, a line
            /// dropped or repeated, a value replaced) load or fail with a `ConfigError`.
            #[test]
            fn run_configs_never_panic(
                which in any::<usize>(),
                edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
                line_edit in proptest::option::of((any::<usize>(), 0u8..3, "[ -~]{0,16}")),
                random in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
            ) {
                let texts = shipped();
                let mut bytes = texts[which % texts.len()].clone().into_bytes();
                for (at, b) in edits {
                    let len = bytes.len();
                    bytes[at % len] = b;
                }
                let mut text = String::from_utf8_lossy(&bytes).into_owned();
                if let Some((at, kind, value)) = line_edit {
                    let mut lines: Vec<String> = text.lines().map(String::from).collect();
                    let i = at % lines.len();
                    match kind {
                        0 => { lines.remove(i); }
                        1 => { let l = lines[i].clone(); lines.insert(i, l); }
                        _ => {
                            if let Some((key, _)) = lines[i].split_once(':') {
                                lines[i] = format!("{key}: {value}");
                            }
                        }
                    }
                    text = lines.join("\n");
                }
                let dir = tempfile::tempdir().unwrap();
                let file = dir.path().join("run.yaml");
                match random {
                    Some(raw) => std::fs::write(&file, raw).unwrap(),
                    None => std::fs::write(&file, text).unwrap(),
                }
                let _ = load(&file);
            }
        }
    }
}
