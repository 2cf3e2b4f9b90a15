//! `tojson` as transformers defines it for chat templates: Python's
//! `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)`
//! (`transformers/utils/chat_template_utils.py`, `tojson`), not minijinja's HTML-safe compact
//! form. Tool schemas rendered into prompts must be byte-identical to what the model saw in
//! training.

use serde_json::Value;

/// How to lay out the JSON: Python's `indent` and `separators` arguments.
#[derive(Debug, Clone)]
pub struct PyJsonStyle {
    /// `indent=`: `None` for one line.
    pub indent: Option<String>,
    /// Between items (`", "`, or `","` when indenting, as Python picks).
    pub item_separator: String,
    /// Between a key and its value.
    pub key_separator: String,
    /// `sort_keys=`.
    pub sort_keys: bool,
}

impl PyJsonStyle {
    /// Python's defaults for an `indent` (`separators` default to `(", ", ": ")` without
    /// indent and `(",", ": ")` with one).
    pub fn new(indent: Option<String>) -> Self {
        let item_separator = if indent.is_some() { "," } else { ", " };
        Self {
            indent,
            item_separator: item_separator.into(),
            key_separator: ": ".into(),
            sort_keys: false,
        }
    }
}

/// `value` as `json.dumps` writes it with `ensure_ascii=False`.
pub fn dumps(value: &Value, style: &PyJsonStyle) -> String {
    let mut out = String::new();
    write_value(&mut out, value, style, 0);
    out
}

fn newline(out: &mut String, style: &PyJsonStyle, depth: usize) {
    if let Some(indent) = &style.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(indent);
        }
    }
}

fn write_value(out: &mut String, value: &Value, style: &PyJsonStyle, depth: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) if items.is_empty() => out.push_str("[]"),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_separator);
                }
                newline(out, style, depth + 1);
                write_value(out, item, style, depth + 1);
            }
            newline(out, style, depth);
            out.push(']');
        }
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_separator);
                }
                newline(out, style, depth + 1);
                write_string(out, key);
                out.push_str(&style.key_separator);
                write_value(out, item, style, depth + 1);
            }
            newline(out, style, depth);
            out.push('}');
        }
    }
}

/// Python prints floats with `repr` (`1.0`, `1e-05`), integers as they are.
fn write_number(out: &mut String, n: &serde_json::Number) {
    if n.is_f64() {
        let f = n.as_f64().unwrap_or(f64::NAN);
        if f.is_finite() && f == f.trunc() && f.abs() < 1e16 {
            out.push_str(&format!("{f:.1}"));
        } else {
            out.push_str(&python_float_repr(f));
        }
    } else {
        out.push_str(&n.to_string());
    }
}

/// Python's `repr(float)`: the shortest round-tripping digits, exponent form below 1e-4 and
/// from 1e16 (`1e-05`, `1e+16`).
fn python_float_repr(f: f64) -> String {
    let text = format!("{f:e}");
    let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if (-4..16).contains(&exponent) {
        return f.to_string();
    }
    let sign = if exponent < 0 { '-' } else { '+' };
    format!("{mantissa}e{sign}{:02}", exponent.abs())
}

/// A JSON string with Python's escapes under `ensure_ascii=False`: `"`, `\\`, `\n`, `\r`,
/// `\t`, `\b`, `\f`, other control characters as `\u00XX`; everything else as is.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matches_python_json_dumps() {
        let v = json!({"name": "get_weather", "parameters": {"type": "object", "required": ["city"], "x": 1.5, "y": 2.0, "z": 1e-5}, "é": "日本\n\"q\""});
        assert_eq!(
            dumps(&v, &PyJsonStyle::new(None)),
            r#"{"name": "get_weather", "parameters": {"type": "object", "required": ["city"], "x": 1.5, "y": 2.0, "z": 1e-05}, "é": "日本\n\"q\""}"#
        );
        assert_eq!(
            dumps(
                &json!({"a": [1, {}], "b": []}),
                &PyJsonStyle::new(Some("  ".into()))
            ),
            "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}"
        );
    }
}
