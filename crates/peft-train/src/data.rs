//! Training data: JSONL and CSV files of examples, tokenized once, label maps, seeded epoch
//! order and dynamic-padding collation.
//!
//! Two tasks read different fields of a row (names set in [`DataConfig`]):
//!
//! - [`TaskKind::Classification`]: `text`, an optional `text_pair` and a `label` (a JSON string
//!   or non-negative integer; in CSV every cell is a string).
//! - [`TaskKind::CausalLm`]: either `text` (loss on every token) or `prompt` + `completion`
//!   (loss on the completion only).
//!
//! Errors name the file and the line (`train.jsonl:3: …`).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_models::HfTokenizer;
use rand::{RngCore, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The file name under which a run stores its [`LabelMap`].
pub const LABEL_MAP_FILE: &str = "label_map.json";

/// The label id of tokens that take no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Errors while reading a data set. Every variant names the file; row errors name the line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file could not be read or written.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A row is not valid: bad JSON or CSV, a missing field, a value of the wrong type, an
    /// empty text.
    #[error("{}:{line}: {reason}", file.display())]
    Malformed {
        /// The file.
        file: PathBuf,
        /// The line (1-based) where the row starts.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A row's label is not in the label map given (the one of the training set).
    #[error("{}:{line}: unknown label `{label}`; known labels: {}", file.display(), known.join(", "))]
    UnknownLabel {
        /// The file.
        file: PathBuf,
        /// The line (1-based).
        line: usize,
        /// The label found.
        label: String,
        /// The labels of the map, in id order.
        known: Vec<String>,
    },
    /// The tokenizer failed on a row.
    #[error("{}:{line}: tokenizer error: {reason}", file.display())]
    Tokenizer {
        /// The data file.
        file: PathBuf,
        /// The line (1-based).
        line: usize,
        /// The cause.
        reason: String,
    },
    /// The file holds no examples.
    #[error("{}: the file holds no examples", file.display())]
    Empty {
        /// The file.
        file: PathBuf,
    },
    /// The data format is neither JSONL nor CSV.
    #[error(
        "{}: unsupported data format `{format}`; use a .jsonl or .csv file, or set `format` to \"jsonl\" or \"csv\"",
        file.display()
    )]
    UnsupportedFormat {
        /// The file.
        file: PathBuf,
        /// The format asked for, or the file's extension.
        format: String,
    },
}

/// How to read a data file: its format, the names of its fields and the token budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// `"jsonl"` or `"csv"`; `None` picks by extension (`.jsonl`, `.json`, `.ndjson`, `.csv`).
    pub format: Option<String>,
    /// The field of the text (classification, plain causal LM). Default `"text"`.
    pub text_field: String,
    /// The field of the second text of a pair (classification). Default `Some("text_pair")`;
    /// each row may have it or not (absent, `null` or empty means no pair).
    pub text_pair_field: Option<String>,
    /// The field of the label (classification). Default `"label"`.
    pub label_field: String,
    /// The field of the prompt (causal LM). Default `"prompt"`.
    pub prompt_field: String,
    /// The field of the completion (causal LM). Default `"completion"`.
    pub completion_field: String,
    /// The most tokens of an example, special tokens included. Default 128.
    pub max_length: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            format: None,
            text_field: "text".into(),
            text_pair_field: Some("text_pair".into()),
            label_field: "label".into(),
            prompt_field: "prompt".into(),
            completion_field: "completion".into(),
            max_length: 128,
        }
    }
}

/// What the examples are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Sequence classification: one label per example.
    Classification,
    /// Causal language modelling: next-token loss on (part of) the tokens.
    CausalLm,
}

/// The class names of a classification data set, in id order.
///
/// Built from the training rows by [`LabelMap::from_labels`]: when every label is a
/// non-negative integer (written without leading zeros) the ids are the integers themselves
/// and the names are `"0"..="max"`; otherwise the names are the distinct labels sorted
/// alphabetically (byte order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    /// The name of each class; the id of a class is its index.
    pub names: Vec<String>,
}

#[derive(Deserialize)]
struct LabelMapFile {
    id2label: HashMap<String, String>,
    #[serde(default)]
    label2id: Option<HashMap<String, usize>>,
}

/// Serializes `(key, value)` pairs as a JSON object in the given order.
struct OrderedMap<'a, V: Serialize>(Vec<(String, &'a V)>);

impl<V: Serialize> Serialize for OrderedMap<'_, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

fn canonical_int(s: &str) -> Option<usize> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits && (s == "0" || !s.starts_with('0')) {
        s.parse().ok()
    } else {
        None
    }
}

impl LabelMap {
    /// Build the map of a set of raw labels (see the type's documentation).
    pub fn from_labels<I, S>(labels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let distinct: BTreeSet<String> =
            labels.into_iter().map(|s| s.as_ref().to_string()).collect();
        let ints: Option<Vec<usize>> = distinct.iter().map(|s| canonical_int(s)).collect();
        let names = match ints {
            Some(ints) if !ints.is_empty() => {
                let max = ints.into_iter().max().unwrap_or(0);
                (0..=max).map(|i| i.to_string()).collect()
            }
            _ => distinct.into_iter().collect(),
        };
        Self { names }
    }

    /// The id of a label.
    pub fn id(&self, label: &str) -> Option<usize> {
        self.names.iter().position(|n| n == label)
    }

    /// The name of an id.
    pub fn name(&self, id: usize) -> Option<&str> {
        self.names.get(id).map(String::as_str)
    }

    /// The number of classes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the map has no class.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Write `{"id2label": {"0": name, …}, "label2id": {name: 0, …}}` (the format of a
    /// Hugging Face `config.json`) to `path` (usually `<dir>/`[`LABEL_MAP_FILE`]), atomically
    /// ([`peft_core::atomic::write_file`]).
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let io = |source| DataError::Io {
            file: path.to_path_buf(),
            source,
        };
        let ids: Vec<usize> = (0..self.names.len()).collect();
        let id2label = OrderedMap(
            self.names
                .iter()
                .enumerate()
                .map(|(i, n)| (i.to_string(), n))
                .collect(),
        );
        let label2id = OrderedMap(
            self.names
                .iter()
                .zip(&ids)
                .map(|(n, i)| (n.clone(), i))
                .collect(),
        );
        let json = serde_json::json!({ "id2label": id2label, "label2id": label2id });
        let mut text = serde_json::to_string_pretty(&json).map_err(|e| io(e.into()))?;
        text.push('\n');
        peft_core::atomic::write_file(path, text.as_bytes()).map_err(|e| DataError::Io {
            file: e.path,
            source: e.source,
        })
    }

    /// Read a map written by [`LabelMap::save`] (or any `id2label` object with ids `0..n`).
    pub fn load(path: &Path) -> Result<Self, DataError> {
        let text = fs::read_to_string(path).map_err(|source| DataError::Io {
            file: path.to_path_buf(),
            source,
        })?;
        let bad = |line: usize, reason: String| DataError::Malformed {
            file: path.to_path_buf(),
            line,
            reason,
        };
        let file: LabelMapFile =
            serde_json::from_str(&text).map_err(|e| bad(e.line(), e.to_string()))?;
        let n = file.id2label.len();
        let mut names = vec![None; n];
        for (id, name) in file.id2label {
            let slot = id
                .parse::<usize>()
                .ok()
                .and_then(|i| names.get_mut(i))
                .ok_or_else(|| bad(1, format!("id2label: id `{id}` is not in 0..{n}")))?;
            *slot = Some(name);
        }
        let names: Vec<String> = names
            .into_iter()
            .map(|n| n.ok_or_else(|| bad(1, "id2label: ids are not 0..n".into())))
            .collect::<Result<_, _>>()?;
        let map = Self { names };
        if let Some(label2id) = file.label2id {
            for (name, id) in label2id {
                if map.id(&name) != Some(id) {
                    return Err(bad(
                        1,
                        format!("label2id[`{name}`] = {id} disagrees with id2label"),
                    ));
                }
            }
        }
        Ok(map)
    }
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids, special tokens included, at most `max_length` of them.
    pub input_ids: Vec<i64>,
    /// Segment ids (0 for the first text, 1 for the pair; all 0 for causal LM).
    pub token_type_ids: Vec<i64>,
    /// The class id (classification).
    pub label: Option<usize>,
    /// Per-token targets (causal LM), aligned with `input_ids` (not shifted: the loss shifts);
    /// [`IGNORE_INDEX`] where no loss is taken.
    pub labels: Option<Vec<i64>>,
    /// The 1-based line of the data file the example was read from (0 when it was not read
    /// from a file), so per-example results can be traced back to their row.
    pub line: usize,
}

/// One row of a data file, either format.
enum Row<'a> {
    Json(&'a serde_json::Map<String, Value>),
    Csv {
        columns: &'a HashMap<String, usize>,
        record: &'a csv::StringRecord,
    },
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Row<'_> {
    /// A text field: `None` when absent, `null` or (CSV) an empty cell.
    fn text(&self, field: &str) -> Result<Option<String>, String> {
        match self {
            Row::Json(obj) => match obj.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => Err(format!(
                    "field `{field}` must be a string, found {}",
                    json_type(v)
                )),
            },
            Row::Csv { columns, record } => Ok(columns
                .get(field)
                .and_then(|&i| record.get(i))
                .filter(|s| !s.is_empty())
                .map(str::to_string)),
        }
    }

    /// A label: a string, or a non-negative integer written in decimal.
    fn label(&self, field: &str) -> Result<Option<String>, String> {
        match self {
            Row::Json(obj) => match obj.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Err(format!("field `{field}` is empty")),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(n) => Ok(Some(n.to_string())),
                    None => Err(format!(
                        "field `{field}` must be a string or a non-negative integer, found {n}"
                    )),
                },
                Some(v) => Err(format!(
                    "field `{field}` must be a string or a non-negative integer, found {}",
                    json_type(v)
                )),
            },
            Row::Csv { .. } => self.text(field),
        }
    }
}

/// The special tokens a tokenizer wraps every single text in: `prefix text suffix`.
struct Specials {
    prefix: Vec<i64>,
    suffix: Vec<i64>,
}

impl Specials {
    /// Found by encoding the empty text (only the special tokens) and a probe text.
    fn of(tok: &HfTokenizer) -> peft_models::Result<Self> {
        let empty = tok.encode("", None, usize::MAX)?.ids;
        for probe in ["a", "hello", "0", "."] {
            let ids = tok.encode(probe, None, usize::MAX)?.ids;
            if ids.len() <= empty.len() {
                continue;
            }
            for k in 0..=empty.len() {
                if ids.starts_with(&empty[..k]) && ids.ends_with(&empty[k..]) {
                    return Ok(Self {
                        prefix: empty[..k].to_vec(),
                        suffix: empty[k..].to_vec(),
                    });
                }
            }
        }
        Ok(Self {
            prefix: empty,
            suffix: Vec::new(),
        })
    }

    /// The tokens of a text without its special tokens.
    fn strip<'a>(&self, ids: &'a [i64]) -> &'a [i64] {
        let (p, s) = (self.prefix.len(), self.suffix.len());
        if ids.len() >= p + s && ids.starts_with(&self.prefix) && ids.ends_with(&self.suffix) {
            &ids[p..ids.len() - s]
        } else {
            ids
        }
    }
}

/// Which format to read `path` as.
fn detect_format(path: &Path, cfg: &DataConfig) -> Result<Format, DataError> {
    let unsupported = |format: String| DataError::UnsupportedFormat {
        file: path.to_path_buf(),
        format,
    };
    let name = match &cfg.format {
        Some(f) => f.to_ascii_lowercase(),
        None => path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .ok_or_else(|| unsupported("(no extension)".into()))?,
    };
    match name.as_str() {
        "jsonl" | "json" | "ndjson" => Ok(Format::Jsonl),
        "csv" => Ok(Format::Csv),
        _ => Err(unsupported(cfg.format.clone().unwrap_or(name))),
    }
}

#[derive(Clone, Copy)]
enum Format {
    Jsonl,
    Csv,
}

/// Turns rows into examples; the label stays raw until every row is read.
struct Builder<'a> {
    file: &'a Path,
    task: TaskKind,
    cfg: &'a DataConfig,
    tok: &'a HfTokenizer,
    specials: Option<Specials>,
    /// `(line, example, raw label)`.
    rows: Vec<(usize, Example, Option<String>)>,
}

impl Builder<'_> {
    fn malformed(&self, line: usize, reason: String) -> DataError {
        DataError::Malformed {
            file: self.file.to_path_buf(),
            line,
            reason,
        }
    }

    fn tokenizer_error(&self, line: usize, e: peft_models::ModelError) -> DataError {
        DataError::Tokenizer {
            file: self.file.to_path_buf(),
            line,
            reason: e.to_string(),
        }
    }

    fn required_text(&self, row: &Row, line: usize, field: &str) -> Result<String, DataError> {
        match row.text(field).map_err(|r| self.malformed(line, r))? {
            None => Err(self.malformed(line, format!("missing field `{field}`"))),
            Some(s) if s.trim().is_empty() => {
                Err(self.malformed(line, format!("field `{field}` is empty")))
            }
            Some(s) => Ok(s),
        }
    }

    fn push(&mut self, row: Row, line: usize) -> Result<(), DataError> {
        let cfg = self.cfg;
        let max = cfg.max_length;
        match self.task {
            TaskKind::Classification => {
                let text = self.required_text(&row, line, &cfg.text_field)?;
                let pair = match &cfg.text_pair_field {
                    Some(f) => row
                        .text(f)
                        .map_err(|r| self.malformed(line, r))?
                        .filter(|s| !s.is_empty()),
                    None => None,
                };
                let label = row
                    .label(&cfg.label_field)
                    .map_err(|r| self.malformed(line, r))?
                    .ok_or_else(|| {
                        self.malformed(line, format!("missing field `{}`", cfg.label_field))
                    })?;
                let enc = self
                    .tok
                    .encode(&text, pair.as_deref(), max)
                    .map_err(|e| self.tokenizer_error(line, e))?;
                let example = Example {
                    input_ids: enc.ids,
                    token_type_ids: enc.type_ids,
                    label: None,
                    labels: None,
                    line,
                };
                self.rows.push((line, example, Some(label)));
            }
            TaskKind::CausalLm => {
                let prompt = row
                    .text(&cfg.prompt_field)
                    .map_err(|r| self.malformed(line, r))?;
                let completion = row
                    .text(&cfg.completion_field)
                    .map_err(|r| self.malformed(line, r))?;
                let (ids, labels) = if prompt.is_some() || completion.is_some() {
                    let prompt = prompt.ok_or_else(|| {
                        self.malformed(
                            line,
                            format!(
                                "field `{}` without field `{}`",
                                cfg.completion_field, cfg.prompt_field
                            ),
                        )
                    })?;
                    let completion = self.required_text(&row, line, &cfg.completion_field)?;
                    self.prompt_completion(line, &prompt, &completion)?
                } else {
                    let text = self.required_text(&row, line, &cfg.text_field)?;
                    let ids = self
                        .tok
                        .encode(&text, None, max)
                        .map_err(|e| self.tokenizer_error(line, e))?
                        .ids;
                    (ids.clone(), ids)
                };
                let example = Example {
                    token_type_ids: vec![0; ids.len()],
                    input_ids: ids,
                    label: None,
                    labels: Some(labels),
                    line,
                };
                self.rows.push((line, example, None));
            }
        }
        Ok(())
    }

    /// `prefix prompt completion suffix`, the loss on `completion suffix`, truncated.
    fn prompt_completion(
        &mut self,
        line: usize,
        prompt: &str,
        completion: &str,
    ) -> Result<(Vec<i64>, Vec<i64>), DataError> {
        if self.specials.is_none() {
            self.specials =
                Some(Specials::of(self.tok).map_err(|e| self.tokenizer_error(line, e))?);
        }
        let encode = |text: &str| {
            self.tok
                .encode(text, None, usize::MAX)
                .map(|e| e.ids)
                .map_err(|e| self.tokenizer_error(line, e))
        };
        let p = encode(prompt)?;
        let c = encode(completion)?;
        let sp = self.specials.as_ref().expect("set above");
        let head: Vec<i64> = sp.prefix.iter().chain(sp.strip(&p)).copied().collect();
        let tail: Vec<i64> = sp.strip(&c).iter().chain(&sp.suffix).copied().collect();
        let mut ids = head.clone();
        ids.extend(&tail);
        let mut labels = vec![IGNORE_INDEX; head.len()];
        labels.extend(&tail);
        ids.truncate(self.cfg.max_length);
        labels.truncate(self.cfg.max_length);
        Ok((ids, labels))
    }
}

fn read_jsonl(text: &str, b: &mut Builder) -> Result<(), DataError> {
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = if i == 0 {
            line.trim_start_matches('\u{feff}')
        } else {
            line
        };
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .map_err(|e| b.malformed(line_no, format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = &value else {
            return Err(b.malformed(
                line_no,
                format!("expected a JSON object, found {}", json_type(&value)),
            ));
        };
        b.push(Row::Json(obj), line_no)?;
    }
    Ok(())
}

fn read_csv(text: &str, b: &mut Builder) -> Result<(), DataError> {
    let text = text.trim_start_matches('\u{feff}');
    let csv_error = |b: &Builder, e: csv::Error| {
        let line = e.position().map_or(1, |p| p.line() as usize);
        b.malformed(line, format!("invalid CSV: {e}"))
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let columns: HashMap<String, usize> = reader
        .headers()
        .map_err(|e| csv_error(b, e))?
        .iter()
        .enumerate()
        .map(|(i, h)| (h.to_string(), i))
        .collect();
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(csv_error(b, e)),
        }
        let line = record.position().map_or(0, |p| p.line() as usize);
        if record.iter().all(str::is_empty) {
            continue;
        }
        b.push(
            Row::Csv {
                columns: &columns,
                record: &record,
            },
            line,
        )?;
    }
    Ok(())
}

/// Read and tokenize a data file.
///
/// JSONL: one object per line, blank lines skipped. CSV: a header row naming the fields, then
/// one row per example (rows whose cells are all empty are skipped; an empty cell is an absent
/// field). Row fields are described in [`DataConfig`] and the module documentation.
///
/// Classification: `text` (and `text_pair` where the row has one) are encoded by the tokenizer
/// with its special tokens, truncated to `max_length`. The label is mapped through `labels`
/// when given (a label outside it is [`DataError::UnknownLabel`]); otherwise a map is built
/// from the file's labels ([`LabelMap::from_labels`]). The map used is returned (`None` for
/// causal LM).
///
/// Causal LM: a `text` row is encoded with the tokenizer's special tokens and every token is a
/// target. A `prompt` + `completion` row is encoded as two texts, each stripped of the special
/// tokens the tokenizer wraps a single text in, then joined so that they appear once around
/// the whole: `prefix prompt completion suffix` (BERT-like: `[CLS] … [SEP]`; Llama: `<s> …`;
/// GPT-2: no special token). The prefix and the prompt take no loss ([`IGNORE_INDEX`]); the
/// completion and the suffix (e.g. an end-of-sequence token) do. The joined row is truncated
/// to `max_length`, so a long prompt can leave a row without targets (a warning counts them).
pub fn load_examples(
    path: &Path,
    task: TaskKind,
    cfg: &DataConfig,
    tokenizer: &HfTokenizer,
    labels: Option<&LabelMap>,
) -> Result<(Vec<Example>, Option<LabelMap>), DataError> {
    let format = detect_format(path, cfg)?;
    let bytes = fs::read(path).map_err(|source| DataError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
        DataError::Malformed {
            file: path.to_path_buf(),
            line,
            reason: "invalid UTF-8".into(),
        }
    })?;
    let mut b = Builder {
        file: path,
        task,
        cfg,
        tok: tokenizer,
        specials: None,
        rows: Vec::new(),
    };
    match format {
        Format::Jsonl => read_jsonl(&text, &mut b)?,
        Format::Csv => read_csv(&text, &mut b)?,
    }
    let rows = b.rows;
    if rows.is_empty() {
        return Err(DataError::Empty {
            file: path.to_path_buf(),
        });
    }
    match task {
        TaskKind::CausalLm => {
            let empty = rows
                .iter()
                .filter(|(_, e, _)| {
                    e.labels
                        .as_ref()
                        .is_some_and(|l| l.iter().all(|&t| t == IGNORE_INDEX))
                })
                .count();
            if empty > 0 {
                log::warn!(
                    "{}: {empty} of {} examples have no target token left after truncation to {} tokens",
                    path.display(),
                    rows.len(),
                    cfg.max_length
                );
            }
            Ok((rows.into_iter().map(|(_, e, _)| e).collect(), None))
        }
        TaskKind::Classification => {
            let map = match labels {
                Some(m) => m.clone(),
                None => LabelMap::from_labels(rows.iter().filter_map(|(_, _, l)| l.as_deref())),
            };
            let examples = rows
                .into_iter()
                .map(|(line, mut e, raw)| {
                    let raw = raw.unwrap_or_default();
                    match map.id(&raw) {
                        Some(id) => {
                            e.label = Some(id);
                            Ok(e)
                        }
                        None => Err(DataError::UnknownLabel {
                            file: path.to_path_buf(),
                            line,
                            label: raw,
                            known: map.names.clone(),
                        }),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok((examples, Some(map)))
        }
    }
}

/// SplitMix64's finalizer: spreads `(seed, epoch)` over the seed space.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform integer in `0..=bound` from raw 64-bit draws (Lemire's method, unbiased).
fn below_or_eq(rng: &mut StdRng, bound: u64) -> u64 {
    let range = bound.wrapping_add(1);
    if range == 0 {
        return rng.next_u64();
    }
    let threshold = range.wrapping_neg() % range;
    loop {
        let m = u128::from(rng.next_u64()) * u128::from(range);
        if (m as u64) >= threshold {
            return (m >> 64) as u64;
        }
    }
}

/// The order of the examples in an epoch: a permutation of `0..len`, the same for the same
/// `(seed, epoch)` (resumed runs see the same batches), different across epochs.
///
/// A Fisher–Yates shuffle of our own over `StdRng` (seeded from a mix of `seed` and `epoch`)
/// drawing raw `u64`s, so the order depends only on `StdRng`'s stream (stable within rand 0.9).
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(mix(seed ^ mix(epoch as u64)));
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        let j = below_or_eq(&mut rng, i as u64) as usize;
        order.swap(i, j);
    }
    order
}

/// A padded batch of examples.
#[derive(Debug, Clone)]
pub struct Collated {
    /// `[b, s]` token ids, right-padded with the pad id.
    pub input_ids: Tensor<2, Int>,
    /// `[b, s]`: 1 for tokens, 0 for padding.
    pub attention_mask: Tensor<2, Int>,
    /// `[b, s]` segment ids, 0 on padding.
    pub token_type_ids: Tensor<2, Int>,
    /// `[b]` class ids, when every example has one.
    pub labels: Option<Tensor<1, Int>>,
    /// `[b, s]` per-token targets padded with [`IGNORE_INDEX`], when every example has them.
    pub lm_labels: Option<Tensor<2, Int>>,
    /// The number of real (non-padding) tokens.
    pub tokens: usize,
}

/// Right-pad a batch to its longest example (at least one column).
///
/// An empty batch gives `[0, 1]` tensors and no labels.
pub fn collate(batch: &[&Example], pad_id: i64, device: &Device) -> Collated {
    let b = batch.len();
    let s = batch
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = vec![pad_id; b * s];
    let mut mask = vec![0i64; b * s];
    let mut types = vec![0i64; b * s];
    let all_lm = b > 0 && batch.iter().all(|e| e.labels.is_some());
    let mut lm = vec![IGNORE_INDEX; if all_lm { b * s } else { 0 }];
    let mut tokens = 0;
    for (row, e) in batch.iter().enumerate() {
        let base = row * s;
        let n = e.input_ids.len();
        tokens += n;
        ids[base..base + n].copy_from_slice(&e.input_ids);
        mask[base..base + n].fill(1);
        let t = e.token_type_ids.len().min(n);
        types[base..base + t].copy_from_slice(&e.token_type_ids[..t]);
        if let (true, Some(l)) = (all_lm, &e.labels) {
            let t = l.len().min(n);
            lm[base..base + t].copy_from_slice(&l[..t]);
        }
    }
    let t2 = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [b, s]), device);
    let labels = (b > 0)
        .then(|| batch.iter().map(|e| e.label.map(|l| l as i64)).collect())
        .flatten()
        .map(|v: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(v, [b]), device));
    Collated {
        input_ids: t2(ids),
        attention_mask: t2(mask),
        token_type_ids: t2(types),
        labels,
        lm_labels: all_lm.then(|| t2(lm)),
        tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BERT-like word-level tokenizer: `[CLS] a [SEP]` / `[CLS] a [SEP] b [SEP]`.
    const VOCAB: &[&str] = &[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "game", "was", "fun", "movie", "bad", "good",
        "is", "what", "capital", "of", "france", "paris", "?", "a", "b", "c", "d", "e",
    ];

    fn tokenizer_json(post_processor: Value) -> String {
        let vocab: serde_json::Map<String, Value> = VOCAB
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), Value::from(i)))
            .collect();
        let added: Vec<Value> = VOCAB[..4]
            .iter()
            .enumerate()
            .map(|(i, t)| {
                serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
            .collect();
        serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Lowercase"},
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": post_processor,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
        })
        .to_string()
    }

    fn bert_post() -> Value {
        let special = |t: &str| serde_json::json!({"SpecialToken": {"id": t, "type_id": 0}});
        let special1 = |t: &str| serde_json::json!({"SpecialToken": {"id": t, "type_id": 1}});
        serde_json::json!({
            "type": "TemplateProcessing",
            "single": [special("[CLS]"), {"Sequence": {"id": "A", "type_id": 0}}, special("[SEP]")],
            "pair": [special("[CLS]"), {"Sequence": {"id": "A", "type_id": 0}}, special("[SEP]"),
                     {"Sequence": {"id": "B", "type_id": 1}}, special1("[SEP]")],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        })
    }

    /// Llama-like: a beginning-of-sequence token only.
    fn bos_post() -> Value {
        serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}}
        })
    }

    fn tokenizer(dir: &Path, post: Value) -> HfTokenizer {
        let file = dir.join("tokenizer.json");
        fs::write(&file, tokenizer_json(post)).unwrap();
        HfTokenizer::from_file(&file).unwrap()
    }

    fn id(t: &str) -> i64 {
        VOCAB.iter().position(|v| *v == t).unwrap() as i64
    }

    fn ids(ts: &str) -> Vec<i64> {
        ts.split_whitespace().map(id).collect()
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    fn load(
        path: &Path,
        task: TaskKind,
        tok: &HfTokenizer,
        map: Option<&LabelMap>,
    ) -> Result<(Vec<Example>, Option<LabelMap>), DataError> {
        load_examples(path, task, &DataConfig::default(), tok, map)
    }

    #[test]
    fn jsonl_classification_string_labels_and_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path(), bert_post());
        let p = write(
            dir.path(),
            "train.jsonl",
            concat!(
                "{\"text\": \"the game was fun\", \"label\": \"games\"}\n",
                "\n",
                "{\"text\": \"the movie\", \"text_pair\": \"was bad\", \"label\": \"movies\"}\n",
                "{\"text\": \"good\", \"text_pair\": null, \"label\": \"books\"}\n",
            ),
        );
        let (ex, map) = load(&p, TaskKind::Classification, &tok, None).unwrap();
        let map = map.unwrap();
        assert_eq!(map.names, ["books", "games", "movies"]);
        assert_eq!(ex.len(), 3);
        assert_eq!(ex[0].input_ids, ids("[CLS] the game was fun [SEP]"));
        assert_eq!(ex[0].token_type_ids, vec![0; 6]);
        assert_eq!(ex[0].label, Some(1));
        assert_eq!(ex[0].labels, None);
        assert_eq!(ex[1].input_ids, ids("[CLS] the movie [SEP] was bad [SEP]"));
        assert_eq!(ex[1].token_type_ids, [0, 0, 0, 0, 1, 1, 1]);
        assert_eq!(ex[1].label, Some(2));
        assert_eq!(ex[2].input_ids, ids("[CLS] good [SEP]"));
        assert_eq!(ex[2].label, Some(0));

        // Saved and loaded back, then used for another file.
        let mp = dir.path().join(LABEL_MAP_FILE);
        map.save(&mp).unwrap();
        let json: Value = serde_json::from_str(&fs::read_to_string(&mp).unwrap()).unwrap();
        assert_eq!(json["id2label"]["0"], "books");
        assert_eq!(json["label2id"]["movies"], 2);
        let back = LabelMap::load(&mp).unwrap();
        assert_eq!(back, map);
        let eval = write(
            dir.path(),
            "eval.jsonl",
            "{\"text\": \"fun\", \"label\": \"movies\"}\n",
        );
        let (ex, m) = load(&eval, TaskKind::Classification, &tok, Some(&back)).unwrap();
        assert_eq!(ex[0].label, Some(2));
        assert_eq!(m.unwrap(), map);
    }

    #[test]
    fn integer_labels_map_to_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path(), bert_post());
        let p = write(
            dir.path(),
            "train.jsonl",
            "{\"text\": \"a\", \"label\": 2}\n{\"text\": \"b\", \"label\": 0}\n{\"text\": \"c\", \"label\": 10}\n",
        );
        let (ex, map) = load(&p, TaskKind::Classification, &tok, None).unwrap();
        let map = map.unwrap();
        assert_eq!(map.len(), 11);
        assert_eq!(map.name(10), Some("10"));
        let got: Vec<_> = ex.iter().map(|e| e.label.unwrap()).collect();
        assert_eq!(got, [2, 0, 10]);
    }

    #[test]
    fn csv_classification_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path(), bert_post());
        // Integer-like strings in CSV map to themselves; quoted commas; an empty pair cell.
        let p = write(
            dir.path(),
            "train.csv",
            "text,text_pair,label\n\"the game, fun\",,1\nthe movie,was bad,0\n\ngood,,1\n",
        );
        let (ex, map) = load(&p, TaskKind::Classification, &tok, None).unwrap();
        assert_eq!(map.unwrap().names, ["0", "1"]);
        assert_eq!(ex.len(), 3);
        assert_eq!(ex[0].input_ids, ids("[CLS] the game [UNK] fun [SEP]"));
        assert_eq!(ex[0].label, Some(1));
        assert_eq!(ex[1].input_ids, ids("[CLS] the movie [SEP] was bad [SEP]"));
        assert_eq!(ex[1].token_type_ids, [0, 0, 0, 0, 1, 1, 1]);
        assert_eq!(ex[1].label, Some(0));

        // String labels in CSV, custom field names, explicit format, truncation.
        let p = write(
            dir.path(),
            "data.txt",
            "sentence,y\nthe game was fun,pos\nbad,neg\n",
        );
        let cfg = DataConfig {
            format: Some("csv".into()),
            text_field: "sentence".into(),
            text_pair_field: None,
            label_field: "y".into(),
            max_length: 3,
            ..DataConfig::default()
        };
        let (ex, map) = load_examples(&p, TaskKind::Classification, &cfg, &tok, None).unwrap();
        assert_eq!(map.unwrap().names, ["neg", "pos"]);
        // transformers' truncation: the special tokens stay, the text is cut.
        assert_eq!(ex[0].input_ids, ids("[CLS] the [SEP]"));
        assert_eq!(ex[0].label, Some(1));
    }

    #[test]
    fn malformed_rows_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path(), bert_post());
        let cases = [
            (
                "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": \"b\", \"label\": 1\n",
                "invalid JSON",
            ),
            (
                "{\"text\": \"a\", \"label\": 0}\n\n{\"label\": 1}\n",
                "missing field `text`",
            ),
            (
                "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": 3, \"label\": 1}\n",
                "must be a string",
            ),
            (
                "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": \" \", \"label\": 1}\n",
                "is empty",
            ),
            (
                "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": \"b\", \"label\": -1}\n",
                "non-negative",
            ),
            (
                "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": \"b\"}\n",
                "missing field `label`",
            ),
            (
                "{\"text\": \"a\", \"label\": 0}\n\n[1, 2]\n",
                "expected a JSON object",
            ),
        ];
        for (text, why) in cases {
            let p = write(dir.path(), "train.jsonl", text);
            let err = load(&p, TaskKind::Classification, &tok, None).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, DataError::Malformed { line: 3, .. }), "{msg}");
            assert!(msg.contains("train.jsonl:3: "), "{msg}");
            assert!(msg.contains(why), "{msg}");
        }
        let p = write(dir.path(), "train.csv", "text,label\na,0\nb\n");
        let msg = load(&p, TaskKind::Classification, &tok, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("train.csv:3: "), "{msg}");
        let p = write(dir.path(), "train.csv", "text,label\na,0\n,1\n");
        let msg = load(&p, TaskKind::Classification, &tok, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("train.csv:3: missing field `text`"), "{msg}");

        let p = write(dir.path(), "empty.jsonl", "\n\n");
        let err = load(&p, TaskKind::Classification, &tok, None).unwrap_err();
        assert!(matches!(err, DataError::Empty { .. }), "{err}");
        let p = write(dir.path(), "x.parquet", "");
        let err = load(&p, TaskKind::Classification, &tok, None).unwrap_err();
        assert!(matches!(err, DataError::UnsupportedFormat { .. }), "{err}");
        let err = load(
            &dir.path().join("nope.jsonl"),
            TaskKind::Classification,
            &tok,
            None,
        )
        .unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err}");
    }

    #[test]
    fn unknown_label_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let tok = tokenizer(dir.path(), bert_post());
        let map = LabelMap::from_labels(["neg", "pos"]);
        let p = write(
            dir.path(),
            "eval.jsonl",
            "{\"text\": \"a\", \"label\": \"pos\"}\n{\"text\": \"b\", \"label\": \"meh\"}\n",
        );
        let err = load(&p, TaskKind::Classification, &tok, Some(&map)).unwrap_err();
        match &err {
            DataError::UnknownLabel {
                line, label, known, ..
            } => {
                assert_eq!((*line, label.as_str()), (2, "meh"));
                assert_eq!(known, &["neg", "pos"]);
            }
            e => panic!("{e}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("eval.jsonl:2: unknown label `meh`; known labels: neg, pos"),
            "{msg}"
        );
    }

    #[test]
    fn label_map_load_validates() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "m.json",
            "{\"id2label\": {\"0\": \"a\", \"2\": \"b\"}}",
        );
        assert!(LabelMap::load(&p).is_err());
        let p = write(
            dir.path(),
            "m.json",
            "{\"id2label\": {\"1\": \"b\", \"0\": \"a\"}, \"label2id\": {\"a\": 0, \"b\": 1}}",
        );
        assert_eq!(LabelMap::load(&p).unwrap().names, ["a", "b"]);
        let p = write(
            dir.path(),
            "m.json",
            "{\"id2label\": {\"0\": \"a\", \"1\": \"b\"}, \"label2id\": {\"a\": 1}}",
        );
        assert!(LabelMap::load(&p).is_err());
    }

    #[test]
    fn causal_lm_prompt_completion_masks_the_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "train.jsonl",
            concat!(
                "{\"prompt\": \"what is the capital of france ?\", \"completion\": \"paris\"}\n",
                "{\"text\": \"the game was fun\"}\n",
                "{\"prompt\": \"\", \"completion\": \"paris\"}\n",
            ),
        );
        // BERT-like: [CLS] and [SEP] once around the whole, loss on the completion and [SEP].
        let tok = tokenizer(dir.path(), bert_post());
        let (ex, map) = load(&p, TaskKind::CausalLm, &tok, None).unwrap();
        assert!(map.is_none());
        assert_eq!(
            ex[0].input_ids,
            ids("[CLS] what is the capital of france ? paris [SEP]")
        );
        let mut want = vec![IGNORE_INDEX; 8];
        want.extend(ids("paris [SEP]"));
        assert_eq!(ex[0].labels.as_ref().unwrap(), &want);
        assert_eq!(ex[0].token_type_ids, vec![0; 10]);
        assert_eq!(ex[0].label, None);
        // Plain text: no mask.
        assert_eq!(ex[1].input_ids, ids("[CLS] the game was fun [SEP]"));
        assert_eq!(ex[1].labels.as_ref().unwrap(), &ex[1].input_ids);
        assert_eq!(ex[2].input_ids, ids("[CLS] paris [SEP]"));
        assert_eq!(
            ex[2].labels.as_ref().unwrap(),
            &[IGNORE_INDEX, id("paris"), id("[SEP]")]
        );

        // Llama-like: one leading BOS, not repeated before the completion.
        let tok = tokenizer(dir.path(), bos_post());
        let (ex, _) = load(&p, TaskKind::CausalLm, &tok, None).unwrap();
        assert_eq!(
            ex[0].input_ids,
            ids("[CLS] what is the capital of france ? paris")
        );
        let mut want = vec![IGNORE_INDEX; 8];
        want.push(id("paris"));
        assert_eq!(ex[0].labels.as_ref().unwrap(), &want);

        // GPT-2-like: no special tokens at all.
        let tok = tokenizer(dir.path(), Value::Null);
        let (ex, _) = load(&p, TaskKind::CausalLm, &tok, None).unwrap();
        assert_eq!(
            ex[0].input_ids,
            ids("what is the capital of france ? paris")
        );
        assert_eq!(ex[0].labels.as_ref().unwrap()[..7], [IGNORE_INDEX; 7]);

        // Truncation cuts the joined row.
        let cfg = DataConfig {
            max_length: 4,
            ..DataConfig::default()
        };
        let tok = tokenizer(dir.path(), bert_post());
        let (ex, _) = load_examples(&p, TaskKind::CausalLm, &cfg, &tok, None).unwrap();
        assert_eq!(ex[0].input_ids.len(), 4);
        assert_eq!(ex[0].labels.as_ref().unwrap(), &[IGNORE_INDEX; 4]);
        assert_eq!(ex[1].input_ids, ids("[CLS] the game [SEP]"));

        // A completion without a prompt is malformed.
        let p = write(dir.path(), "bad.jsonl", "{\"completion\": \"paris\"}\n");
        let msg = load(&p, TaskKind::CausalLm, &tok, None)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("bad.jsonl:1: "), "{msg}");
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(100, 42, 0);
        assert_eq!(a, epoch_order(100, 42, 0));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(a, (0..100).collect::<Vec<_>>());
        assert_ne!(a, epoch_order(100, 42, 1));
        assert_ne!(a, epoch_order(100, 43, 0));
        assert_eq!(epoch_order(0, 1, 0), Vec::<usize>::new());
        assert_eq!(epoch_order(1, 1, 0), vec![0]);
    }

    fn vec2(t: Tensor<2, Int>) -> (Vec<usize>, Vec<i64>) {
        let dims = t.dims().to_vec();
        (dims, t.into_data().iter::<i64>().collect())
    }

    #[test]
    fn collate_pads_right() {
        let device = Device::flex();
        let a = Example {
            input_ids: vec![2, 4, 5, 3],
            token_type_ids: vec![0, 0, 1, 1],
            label: Some(1),
            labels: None,
            line: 0,
        };
        let b = Example {
            input_ids: vec![2, 3],
            token_type_ids: vec![0, 0],
            label: Some(0),
            labels: None,
            line: 0,
        };
        let c = collate(&[&a, &b], 0, &device);
        assert_eq!(
            vec2(c.input_ids),
            (vec![2, 4], vec![2, 4, 5, 3, 2, 3, 0, 0])
        );
        assert_eq!(vec2(c.attention_mask).1, [1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(vec2(c.token_type_ids).1, [0, 0, 1, 1, 0, 0, 0, 0]);
        let labels = c.labels.unwrap();
        assert_eq!(labels.dims(), [2]);
        assert_eq!(labels.into_data().iter::<i64>().collect::<Vec<_>>(), [1, 0]);
        assert!(c.lm_labels.is_none());
        assert_eq!(c.tokens, 6);

        let lm = |ids: Vec<i64>, labels: Vec<i64>| Example {
            token_type_ids: vec![0; ids.len()],
            input_ids: ids,
            label: None,
            labels: Some(labels),
            line: 0,
        };
        let x = lm(vec![7, 8], vec![-100, 8]);
        let y = lm(vec![7, 8, 9], vec![7, 8, 9]);
        let c = collate(&[&x, &y], 5, &device);
        assert_eq!(vec2(c.input_ids), (vec![2, 3], vec![7, 8, 5, 7, 8, 9]));
        assert_eq!(vec2(c.lm_labels.unwrap()).1, [-100, 8, -100, 7, 8, 9]);
        assert!(c.labels.is_none());
        assert_eq!(c.tokens, 5);
    }
}
