//! Chat: conversations, the model's chat template, and conversations as token ids with the
//! assistant's tokens marked (for assistant-only loss).
//!
//! The template is the model's own Hugging Face `chat_template` (from `chat_template.jinja`,
//! `tokenizer_config.json` or a GGUF file's `tokenizer.chat_template`), rendered as
//! transformers' `apply_chat_template` renders it ([`ChatTemplate`]), so the prompts a model
//! is fine-tuned on are the ones it is served with.

mod encode;
mod pyjson;
mod template;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use encode::{ChatEncoding, encode_chat};
pub use template::{ChatTemplate, RenderOptions, Rendered};

/// One message of a conversation, in the OpenAI / transformers format: a `role` (`system`,
/// `user`, `assistant`, `tool`, ...) and its `content` (a string, or a list of parts such as
/// `{"type": "text", "text": ...}`); other fields (`tool_calls`, `reasoning_content`, `name`)
/// pass through to the template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: String,
    /// What is said.
    #[serde(default)]
    pub content: Value,
    /// Anything else the message carries.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    /// A message with text content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Value::String(content.into()),
            extra: Map::new(),
        }
    }

    /// The text of the content: the string, or the `text` parts joined; `None` for other
    /// content.
    pub fn text(&self) -> Option<String> {
        match &self.content {
            Value::String(s) => Some(s.clone()),
            Value::Array(parts) => {
                let texts: Option<Vec<&str>> = parts
                    .iter()
                    .map(|p| match p.get("type").and_then(Value::as_str) {
                        Some("text") => p.get("text").and_then(Value::as_str),
                        _ => None,
                    })
                    .collect();
                texts.map(|t| t.concat())
            }
            _ => None,
        }
    }

    fn has_marker_chars(&self) -> bool {
        serde_json::to_string(self).is_ok_and(|s| s.contains(['\u{FDD0}', '\u{FDD1}']))
    }
}

/// Largest chat template file read (the published ones are under 20 KB).
const MAX_TEMPLATE_BYTES: u64 = 1 << 20;

/// The chat template of a model (or adapter) folder, as transformers finds it:
/// `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template` (a string, or the
/// `default` of a list of named templates). With it, where it came from (`file: key`).
pub fn template_of_folder(dir: &std::path::Path) -> Option<(String, String)> {
    let read = |name: &str| {
        let file = dir.join(name);
        let len = std::fs::metadata(&file).ok()?.len();
        (len <= MAX_TEMPLATE_BYTES).then(|| std::fs::read_to_string(&file).ok())?
    };
    if let Some(text) = read("chat_template.jinja") {
        return Some((dir.join("chat_template.jinja").display().to_string(), text));
    }
    let config: Value = serde_json::from_str(&read("tokenizer_config.json")?).ok()?;
    let source = match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }?;
    let name = format!(
        "{}: chat_template",
        dir.join("tokenizer_config.json").display()
    );
    Some((name, source))
}

/// The special tokens a chat template sees (transformers' `special_tokens_map`), from a model
/// folder's `tokenizer_config.json` (else `special_tokens_map.json`): each of `bos_token`,
/// `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token` that is set,
/// as a string or as an added token's `content`.
pub fn special_tokens_of_folder(dir: &std::path::Path) -> Vec<(String, String)> {
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
            continue;
        };
        let Ok(config) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let tokens: Vec<(String, String)> = SPECIAL_TOKENS
            .iter()
            .filter_map(|name| {
                let v = config.get(*name)?;
                let token = v
                    .as_str()
                    .or_else(|| v.get("content").and_then(Value::as_str))?;
                Some((name.to_string(), token.to_string()))
            })
            .collect();
        if !tokens.is_empty() {
            return tokens;
        }
    }
    Vec::new()
}

/// transformers' `SPECIAL_TOKENS_ATTRIBUTES` (less `additional_special_tokens`).
pub const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];
