//! `burn-peft train --set KEY=VALUE`: config keys overridden from the command line, applied
//! over the parsed file (an error in an override names it).

use std::path::Path;

use serde_json::Value;

use super::lines::{unknown_key_message, yaml_error};
use super::{ConfigError, RunConfig};

/// One `--set KEY=VALUE`: a dotted key of the config (`train.learning_rate`) and a YAML value
/// (`2e-4`, `true`, `[q_proj, v_proj]`, text).
#[derive(Debug, Clone, PartialEq)]
pub struct SetValue {
    /// The dotted key.
    pub key: String,
    /// The value as written.
    pub raw: String,
}

/// clap value parser of `--set`.
pub fn parse_set(value: &str) -> Result<SetValue, String> {
    match value.split_once('=') {
        Some((key, raw)) if !key.trim().is_empty() && !key.split('.').any(str::is_empty) => {
            Ok(SetValue {
                key: key.trim().to_string(),
                raw: raw.to_string(),
            })
        }
        _ => Err(format!(
            "`{value}`: expected KEY=VALUE with a dotted key, e.g. train.learning_rate=2e-4"
        )),
    }
}

/// The config text as a JSON tree with every `--set` applied.
pub(super) fn apply_sets(
    file: &Path,
    text: &str,
    sets: &[SetValue],
) -> Result<RunConfig, ConfigError> {
    let err = |message: String| ConfigError {
        file: file.to_path_buf(),
        line: None,
        message,
    };
    let mut tree: Value = serde_saphyr::from_str(text).map_err(|e| yaml_error(file, text, &e))?;
    for set in sets {
        let value: Value = serde_saphyr::from_str(&set.raw)
            .ok()
            .filter(|v: &Value| !v.is_null() || set.raw.trim() == "null")
            .unwrap_or_else(|| Value::String(set.raw.clone()));
        let mut node = &mut tree;
        let parts: Vec<&str> = set.key.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let Value::Object(map) = node else {
                return Err(err(format!(
                    "--set {}: `{}` is not a block of keys",
                    set.key,
                    parts[..i].join(".")
                )));
            };
            if i + 1 == parts.len() {
                map.insert(part.to_string(), value.clone());
                break;
            }
            node = map
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Default::default()));
        }
    }
    serde_json::from_value(tree).map_err(|e| {
        let message = e.to_string();
        let keys: Vec<&str> = sets.iter().map(|s| s.key.as_str()).collect();
        let message = match message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once("`, expected one of "))
        {
            Some((field, expected)) => {
                let expected: Vec<String> = expected
                    .split(", ")
                    .map(|k| k.trim_matches('`').to_string())
                    .collect();
                unknown_key_message(field, &expected)
            }
            None => message,
        };
        err(format!("with --set {}: {message}", keys.join(", ")))
    })
}
