//! Reading and writing adapter bundles in Hugging Face PEFT's on-disk format:
//! `adapter_config.json` + `adapter_model.safetensors`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::adapter::TensorSource;
use crate::error::{PeftError, Result};
use crate::method::PeftMethod;

/// File name of the adapter config.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of the adapter weights as a PyTorch pickle (PEFT's
/// `save_pretrained(safe_serialization=False)`, still common on the Hub); read when a bundle has
/// no [`WEIGHTS_FILE`].
pub const PICKLE_WEIGHTS_FILE: &str = "adapter_model.bin";
/// Prefix PEFT puts before module paths in the weights file.
pub const KEY_PREFIX: &str = "base_model.model.";

fn io_err(file: &Path) -> impl FnOnce(std::io::Error) -> PeftError + '_ {
    move |source| PeftError::Io {
        file: file.to_path_buf(),
        source,
    }
}

/// The folder PEFT uses for adapter `name` under `dir`: `dir` itself for `default`, else
/// `dir/name`.
pub fn adapter_dir(dir: &Path, name: &str) -> PathBuf {
    if name == "default" {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

/// The names of every method linked into this program, as `peft_type` values.
pub fn registered_methods() -> Vec<String> {
    let probe = serde_json::json!({ "peft_type": "\u{1}" });
    match serde_json::from_value::<Box<dyn PeftMethod>>(probe) {
        Ok(_) => Vec::new(),
        Err(e) => parse_expected_variants(&e.to_string()),
    }
}

/// The names serde lists after "expected" in an unknown-variant error: "expected `A`",
/// "expected `A` or `B`", "expected one of `A`, `B`, `C`".
fn parse_expected_variants(message: &str) -> Vec<String> {
    let Some(rest) = message.split(", expected ").nth(1) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// Serialize a method config to the JSON PEFT writes: `peft_type` plus the method's fields.
pub fn method_to_json(method: &dyn PeftMethod) -> Value {
    serde_json::to_value(method).expect("method configs serialize to JSON")
}

/// Render a JSON object as PEFT does (`json.dump(indent=2, sort_keys=True)`).
pub fn render_config(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(&sorted(value)).expect("JSON values render");
    text.push('\n');
    text
}

/// `value` with the keys of every object sorted. Maps keep insertion order in memory because
/// PEFT's `rank_pattern` / `alpha_pattern` are ordered (first match wins) as read.
fn sorted(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

/// A method config read from a file, with the keys we did not recognise.
#[derive(Debug)]
pub struct LoadedConfig {
    /// The method.
    pub method: Box<dyn PeftMethod>,
    /// Keys present in the file that the method does not know (a warning, as in PEFT).
    pub unknown_keys: Vec<String>,
}

/// Parse a method config from JSON text; `file` is used in errors.
pub fn parse_config(text: &str, file: &Path) -> Result<LoadedConfig> {
    let value: Value = serde_json::from_str(text).map_err(|e| PeftError::CorruptFile {
        file: file.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })?;
    parse_config_value(value, Some(file))
}

/// Parse a method config from a JSON value (for configs embedded in other files).
pub fn parse_config_value(value: Value, file: Option<&Path>) -> Result<LoadedConfig> {
    let with_file = |e: PeftError| match file {
        Some(f) => e.in_file(f),
        None => e,
    };
    let Value::Object(map) = &value else {
        return Err(with_file(PeftError::invalid_config(
            "<root>",
            "expected a JSON object with a `peft_type` key",
        )));
    };
    let peft_type = match map.get("peft_type") {
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(with_file(PeftError::invalid_config(
                "peft_type",
                format!("expected a string such as \"LORA\", found {other}"),
            )));
        }
        None => {
            return Err(with_file(PeftError::invalid_config(
                "peft_type",
                format!(
                    "missing; expected one of: {}",
                    registered_methods().join(", ")
                ),
            )));
        }
    };
    let registered = registered_methods();
    if !registered.contains(&peft_type) {
        return Err(with_file(PeftError::UnknownPeftType {
            file: None,
            found: peft_type,
            registered,
        }));
    }
    let original_keys: Vec<String> = map.keys().cloned().collect();
    let method: Box<dyn PeftMethod> = serde_json::from_value(value.clone()).map_err(|e| {
        let message = e.to_string();
        let key = message
            .split('`')
            .nth(1)
            .filter(|_| message.contains("field"))
            .map(str::to_string)
            .or_else(|| culprit_key(map, &message))
            .unwrap_or_else(|| "<config>".into());
        with_file(PeftError::invalid_config(key, message))
    })?;
    method.validate().map_err(with_file)?;
    let known = match method_to_json(method.as_ref()) {
        Value::Object(m) => m.keys().cloned().collect::<HashSet<_>>(),
        _ => HashSet::new(),
    };
    let unknown_keys: Vec<String> = original_keys
        .into_iter()
        .filter(|k| !known.contains(k))
        .collect();
    for key in &unknown_keys {
        log::warn!(
            "{}: unknown key `{key}` ignored (written by a newer PEFT?)",
            file.map(|f| f.display().to_string())
                .unwrap_or_else(|| "<config>".into())
        );
    }
    Ok(LoadedConfig {
        method,
        unknown_keys,
    })
}

/// The key whose value a type error is about (`"r": "eight"` gives "invalid type: string
/// \"eight\", expected usize", which names no field): the first key (besides `peft_type`)
/// without which that error goes away.
fn culprit_key(map: &serde_json::Map<String, Value>, message: &str) -> Option<String> {
    map.keys().filter(|k| *k != "peft_type").find_map(|key| {
        let mut without = map.clone();
        without.remove(key);
        let still = serde_json::from_value::<Box<dyn PeftMethod>>(Value::Object(without))
            .err()
            .is_some_and(|e| e.to_string() == message);
        (!still).then(|| key.clone())
    })
}

/// Sizes a method's config gives, checked against the tensors of the bundle's weights file
/// before anything is allocated: an optional second seam of a method plugin.
///
/// Loading a bundle builds each adapter at the size its config says, then reads the file's
/// tensors into it. A config that says more than its file backs (`"r": 1099511627776` next to
/// rank-8 tensors, a prefix of 2^40 virtual tokens) made that first step allocate terabytes,
/// and a failed allocation aborts the process (no error, no `catch_unwind`). A method registers
/// the check under its `peft_type` as it registers itself, in its own crate:
/// `#[typetag::deserialize(name = "LORA")] impl BundleShapes for LoraConfig`; methods without
/// one are loaded as before.
#[typetag::deserialize(tag = "peft_type")]
pub trait BundleShapes {
    /// Check the config against `shapes` (every tensor of the weights file, by name): sizes
    /// the file cannot back are [`PeftError::InvalidConfig`] naming the key.
    fn check_shapes(&self, shapes: &BTreeMap<String, Vec<usize>>) -> Result<()>;
}

/// Run the [`BundleShapes`] check registered for `method`'s `peft_type`, if there is one.
pub fn check_bundle_shapes(
    method: &dyn PeftMethod,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<()> {
    match serde_json::from_value::<Box<dyn BundleShapes>>(method_to_json(method)) {
        Ok(check) => check.check_shapes(shapes),
        // No check registered for this `peft_type`: nothing to compare.
        Err(_) => Ok(()),
    }
}

/// Read and validate `adapter_config.json` in `dir`.
pub fn read_config(dir: &Path) -> Result<LoadedConfig> {
    let file = dir.join(CONFIG_FILE);
    let text = fs::read_to_string(&file).map_err(io_err(&file))?;
    parse_config(&text, &file)
}

/// All tensors of a safetensors file as `f32`, keyed by name, plus which ones were used.
pub struct TensorFile {
    file: PathBuf,
    tensors: HashMap<String, TensorData>,
    used: HashSet<String>,
}

impl TensorFile {
    /// Read `path`; truncated or malformed files are [`PeftError::CorruptFile`].
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).map_err(io_err(path))?;
        Self::from_bytes(&bytes, path)
    }

    /// Parse safetensors bytes; `path` names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| PeftError::CorruptFile {
            file: path.to_path_buf(),
            reason: format!("not a valid safetensors file: {e}"),
        })?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let float = match view.dtype() {
                Dtype::F32 => Float::F32,
                Dtype::F16 => Float::F16,
                Dtype::BF16 => Float::BF16,
                other => {
                    return Err(PeftError::UnsupportedDtype {
                        file: path.to_path_buf(),
                        key: name,
                        found: format!("{other:?}"),
                    });
                }
            };
            let values = float.decode(view.data());
            tensors.insert(name, TensorData::new(values, view.shape().to_vec()));
        }
        Ok(Self {
            file: path.to_path_buf(),
            tensors,
            used: HashSet::new(),
        })
    }

    /// The weights of the bundle in `dir` and the file they came from:
    /// `adapter_model.safetensors`, else PEFT's pickled `adapter_model.bin`
    /// ([`read_pickle`](Self::read_pickle)).
    pub fn read_bundle_weights(dir: &Path) -> Result<(PathBuf, Self)> {
        let safetensors = dir.join(WEIGHTS_FILE);
        let pickle = dir.join(PICKLE_WEIGHTS_FILE);
        if !safetensors.exists() && pickle.is_file() {
            let file = Self::read_pickle(&pickle)?;
            return Ok((pickle, file));
        }
        let file = Self::read(&safetensors)?;
        Ok((safetensors, file))
    }

    /// Read a PyTorch pickle of tensors (`torch.save(state_dict)`, as PEFT writes
    /// `adapter_model.bin`) as data, with burn-store's PyTorch reader: nothing in the file is
    /// executed. The pickle must be a dictionary of float tensors and nothing else; anything
    /// else (another object, a nested dictionary, an integer tensor) is
    /// [`PeftError::CorruptFile`] or [`PeftError::UnsupportedDtype`] naming the entry.
    pub fn read_pickle(path: &Path) -> Result<Self> {
        use pytorch_reader::{DType as PtDType, PickleValue, PytorchReader};
        let corrupt = |reason: String| PeftError::CorruptFile {
            file: path.to_path_buf(),
            reason,
        };
        let not_pickle = |e: pytorch_reader::PytorchError| {
            corrupt(format!("not a readable PyTorch pickle of tensors: {e}"))
        };
        let reader = PytorchReader::new(path).map_err(not_pickle)?;
        let PickleValue::Dict(entries) =
            PytorchReader::read_pickle_data(path, None).map_err(not_pickle)?
        else {
            return Err(corrupt(
                "the pickle does not hold a dictionary of tensors".into(),
            ));
        };
        let mut names: Vec<&String> = entries.keys().collect();
        names.sort();
        if let Some(other) = names.iter().find(|k| reader.get(k).is_none()) {
            let kind = match &entries[*other] {
                PickleValue::Unsupported(t) => t.clone(),
                PickleValue::Dict(_) => "a dictionary".into(),
                value => format!("{value:?}"),
            };
            return Err(corrupt(format!(
                "entry `{other}` holds {kind}, not a tensor; an adapter pickle holds only \
                 tensors"
            )));
        }
        let mut tensors = HashMap::new();
        for (name, tensor) in reader.into_tensors() {
            let float = match tensor.dtype() {
                PtDType::F32 => Float::F32,
                PtDType::F16 => Float::F16,
                PtDType::BF16 => Float::BF16,
                other => {
                    return Err(PeftError::UnsupportedDtype {
                        file: path.to_path_buf(),
                        key: name,
                        found: format!("{other:?}"),
                    });
                }
            };
            let shape = tensor.shape().to_vec();
            // The reader gives native-endian bytes; safetensors files are little-endian.
            let bytes = tensor
                .read()
                .map_err(|e| corrupt(format!("cannot read tensor `{name}`: {e}")))?;
            let bytes = float.native_to_le(bytes);
            tensors.insert(name, TensorData::new(float.decode(&bytes), shape));
        }
        Ok(Self {
            file: path.to_path_buf(),
            tensors,
            used: HashSet::new(),
        })
    }

    /// The file this came from.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// Every tensor's name and shape.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.shape().to_vec()))
            .collect()
    }

    /// Take `key` with the `expected` shape.
    pub fn take(&mut self, key: &str, expected: &[usize]) -> Result<TensorData> {
        let data = self
            .tensors
            .get(key)
            .ok_or_else(|| PeftError::MissingTensor {
                file: self.file.clone(),
                key: key.to_string(),
            })?;
        if data.shape().as_slice() != expected {
            return Err(PeftError::ShapeMismatch {
                file: self.file.clone(),
                key: key.to_string(),
                expected: expected.to_vec(),
                found: data.shape().to_vec(),
            });
        }
        self.used.insert(key.to_string());
        Ok(data.clone())
    }

    /// Whether `key` exists.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// Keys no one took, sorted.
    pub fn unused_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !self.used.contains(*k))
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// A view of this file for the names under `prefix` + `path` + `.`.
    pub fn site_with(&mut self, prefix: &str, path: &str) -> SiteTensors<'_> {
        SiteTensors {
            prefix: format!("{prefix}{path}."),
            file: self,
        }
    }

    /// A view of this file for the site at `path` (`base_model.model.<path>.` prefixed names);
    /// an empty `path` gives bare names (prompt-learning tensors such as `prompt_embeddings`).
    pub fn site(&mut self, path: &str) -> SiteTensors<'_> {
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{KEY_PREFIX}{path}.")
        };
        SiteTensors { prefix, file: self }
    }
}

/// The float types a bundle may store (PEFT saves the adapter's dtype).
#[derive(Debug, Clone, Copy)]
enum Float {
    F32,
    F16,
    BF16,
}

impl Float {
    /// Little-endian bytes to `f32` values.
    fn decode(self, data: &[u8]) -> Vec<f32> {
        match self {
            Float::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Float::F16 => data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Float::BF16 => data
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }

    /// Native-endian element bytes as little-endian ones.
    fn native_to_le(self, mut bytes: Vec<u8>) -> Vec<u8> {
        if cfg!(target_endian = "big") {
            let width = match self {
                Float::F32 => 4,
                Float::F16 | Float::BF16 => 2,
            };
            bytes.chunks_exact_mut(width).for_each(<[u8]>::reverse);
        }
        bytes
    }
}

/// The tensors of one site, seen through its key prefix.
pub struct SiteTensors<'a> {
    file: &'a mut TensorFile,
    prefix: String,
}

impl TensorSource for SiteTensors<'_> {
    fn take(&mut self, name: &str, expected: &[usize]) -> Result<TensorData> {
        let key = format!("{}{name}", self.prefix);
        self.file.take(&key, expected)
    }

    fn contains(&self, name: &str) -> bool {
        self.file.contains(&format!("{}{name}", self.prefix))
    }
}

/// Encode named `f32` tensors as safetensors bytes with PEFT's metadata (`format: pt`).
pub fn encode_safetensors(tensors: &BTreeMap<String, TensorData>) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    let buffers: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, data)| {
            let values = data.try_to_vec::<f32>().unwrap_or_else(|_| {
                data.clone()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .expect("converted to f32")
            });
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), data.shape().to_vec(), bytes)
        })
        .collect();
    for (name, shape, bytes) in &buffers {
        let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
            .map_err(|e| PeftError::InvalidState(format!("cannot encode tensor `{name}`: {e}")))?;
        views.push((name.clone(), view));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| PeftError::InvalidState(format!("cannot encode safetensors: {e}")))
}

/// Write a bundle's files into `dir` so that either all of them are replaced or none is: the
/// folder is staged and swapped in whole ([`atomic::StagedDir`](crate::atomic::StagedDir)), so a
/// crash never pairs new weights with an old config. Other entries of `dir` (the sub-folders of
/// other adapters, a README) are kept.
pub fn write_files_atomically(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let staged = crate::atomic::StagedDir::create(dir)?;
    for (name, bytes) in files {
        staged.write(name, bytes)?;
    }
    staged.commit(crate::atomic::Previous::KeepOtherEntries)?;
    Ok(())
}
