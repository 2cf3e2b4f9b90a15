//! Where a config error is: the line of a key in the YAML text, serde_saphyr's errors turned
//! into ours (the key of a value of the wrong type, "did you mean" for unknown keys).

use std::path::Path;

use peft_core::matching::edit_distance;

use super::ConfigError;

/// The error of a YAML text that does not parse into a run config: its line, the key of that
/// line when the message names none, and the value found.
pub(super) fn yaml_error(file: &Path, source: &str, e: &serde_saphyr::Error) -> ConfigError {
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
        // A value of the wrong type (`batch_size: -4` is "invalid u64"): name the key of the
        // line it is on.
        None => match line
            .and_then(|l| source.lines().nth(l as usize - 1))
            .and_then(|l| l.trim().trim_start_matches("- ").split_once(':'))
            .map(|(key, value)| {
                let value = value.split(" #").next().unwrap_or_default().trim();
                (key.trim().trim_matches(['"', '\'']), value)
            })
            .filter(|(key, _)| !key.is_empty() && !message.contains(&format!("`{key}`")))
        {
            Some((key, value)) if !value.is_empty() => {
                format!("`{key}`: {message} (found `{value}`)")
            }
            Some((key, _)) => format!("`{key}`: {message}"),
            None => message.to_string(),
        },
    };
    ConfigError {
        file: file.to_path_buf(),
        line,
        message,
    }
}

/// "unknown key `x`; did you mean `y`? Valid keys: …".
pub(super) fn unknown_key_message(found: &str, expected: &[String]) -> String {
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

/// The 1-based line of `key:` in the `section:` block of the config `file` (for errors found
/// after loading, e.g. a `target_modules` entry the model lacks).
pub fn line_in_file(file: &Path, section: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    key_line(&text, Some(section), key)
}

/// The 1-based line of `key:` in the top-level `section:` block (or at top level).
pub(super) fn key_line(text: &str, section: Option<&str>, key: &str) -> Option<u64> {
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
