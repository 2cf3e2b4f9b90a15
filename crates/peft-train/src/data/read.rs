//! Reading data files: format detection, JSONL and CSV rows, and [`load_examples`].

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use peft_models::HfTokenizer;
use peft_models::chat::ChatTemplate;
use serde_json::Value;

use super::encode::{Builder, Example};
use super::{DataConfig, DataError, IGNORE_INDEX, LabelMap, TaskKind};

/// One row of a data file, either format.
pub(super) enum Row<'a> {
    Json(&'a serde_json::Map<String, Value>),
    Csv {
        columns: &'a HashMap<String, usize>,
        record: &'a csv::StringRecord,
    },
}

/// How a JSON value is named in errors (`a string`, `an array`, ...).
pub(super) fn json_type(v: &Value) -> &'static str {
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
    pub(super) fn text(&self, field: &str) -> Result<Option<String>, String> {
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

    /// The names of the row's fields (a CSV file's columns), sorted, for "missing field"
    /// errors.
    pub(super) fn field_names(&self) -> Vec<String> {
        let mut names: Vec<String> = match self {
            Row::Json(obj) => obj.keys().cloned().collect(),
            Row::Csv { columns, .. } => columns.keys().cloned().collect(),
        };
        names.sort();
        names
    }

    /// A JSON field as it is (`None` when absent or `null`, and in a CSV row).
    pub(super) fn field(&self, field: &str) -> Option<&Value> {
        match self {
            Row::Json(obj) => obj.get(field).filter(|v| !v.is_null()),
            Row::Csv { .. } => None,
        }
    }

    /// A label: a string, or a non-negative integer written in decimal.
    pub(super) fn label(&self, field: &str) -> Result<Option<String>, String> {
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
                format!(
                    "expected a JSON object, found {}: a JSON Lines file holds one object per \
                     line{}",
                    json_type(&value),
                    if value.is_array() {
                        " (a JSON array file converts with `jq -c '.[]' in.json > out.jsonl`)"
                    } else {
                        ""
                    }
                ),
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
/// A `messages` row (JSON Lines) is a conversation rendered with `chat`, the model's chat
/// template, with the loss on the assistant's tokens ([`chat`](super::chat)); without a
/// template it is an error naming the line.
pub fn load_examples(
    path: &Path,
    task: TaskKind,
    cfg: &DataConfig,
    tokenizer: &HfTokenizer,
    chat: Option<&ChatTemplate>,
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
        chat,
        shortened: 0,
        specials: None,
        rows: Vec::new(),
    };
    match format {
        Format::Jsonl => read_jsonl(&text, &mut b)?,
        Format::Csv => read_csv(&text, &mut b)?,
    }
    if b.shortened > 0 {
        log::warn!(
            "{}: {} of {} conversations were shortened to {} tokens (the longest system / user \
             message cut at its end; every turn kept)",
            path.display(),
            b.shortened,
            b.rows.len(),
            cfg.max_length
        );
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
