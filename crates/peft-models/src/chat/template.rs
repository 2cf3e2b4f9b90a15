//! A Hugging Face `chat_template`, rendered with minijinja as transformers renders it with
//! Jinja2 (`transformers/utils/chat_template_utils.py`, `_compile_jinja_template` and
//! `render_jinja_template`):
//!
//! - an immutable sandbox with `trim_blocks` and `lstrip_blocks`, the loop-controls extension
//!   (`{% break %}`, `{% continue %}`) and Jinja2's lenient undefined values;
//! - the globals `raise_exception(message)` and `strftime_now(format)`, and a `tojson` filter
//!   that writes what Python's `json.dumps(ensure_ascii=False)` writes;
//! - the variables `messages`, `tools`, `documents`, `add_generation_prompt`, the tokenizer's
//!   special tokens (`bos_token`, `eos_token`, ...) and any extra template keyword;
//! - Python's string and dict methods (`.strip()`, `.startswith()`, `.items()`, ...), which the
//!   published templates call, through minijinja-contrib's `pycompat`;
//! - `{% generation %}` ... `{% endgeneration %}` blocks (transformers' `AssistantTracker`):
//!   the text they render is recorded as the assistant's, for assistant-only loss.

use std::ops::Range;

use minijinja::{Environment, Error, ErrorKind, Value as JinjaValue, context};
use serde_json::{Map, Value};

use super::ChatMessage;
use super::pyjson::{PyJsonStyle, dumps};
use crate::error::{ModelError, Result};

/// Marks the start and end of a `{% generation %}` block's output in the rendered text
/// (Unicode noncharacters: never in a tokenizer's text, refused in messages).
const GENERATION_START: char = '\u{FDD0}';
const GENERATION_END: char = '\u{FDD1}';

/// Instructions a template may run per render: generous for any real template (the largest
/// published ones take well under 100k), a bound for a hostile one.
const FUEL: u64 = 50_000_000;

/// How to render: the generation prompt and extra template variables.
#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// Append the prompt that starts an assistant turn (`add_generation_prompt=True`).
    pub add_generation_prompt: bool,
    /// Extra template variables (`enable_thinking`, `date_string`, `tools`, ...), as
    /// transformers passes `**kwargs` of `apply_chat_template`.
    pub variables: Map<String, Value>,
}

/// A rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The prompt text.
    pub text: String,
    /// Byte ranges of `text` rendered inside `{% generation %}` blocks (empty when the
    /// template has none).
    pub generation: Vec<Range<usize>>,
}

/// A compiled chat template with the tokenizer's special tokens.
///
/// ```
/// use peft_models::chat::{ChatMessage, ChatTemplate};
///
/// let template = ChatTemplate::new(
///     "example",
///     "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}{{ eos_token }}\n{% endfor %}\
///      {% if add_generation_prompt %}<|assistant|>{% endif %}",
///     [("eos_token", "</s>")],
/// )?;
/// let text = template.render(&[ChatMessage::new("user", " Hi! ")], true)?;
/// assert_eq!(text, "<|user|>Hi!</s>\n<|assistant|>");
/// # Ok::<(), peft_models::ModelError>(())
/// ```
pub struct ChatTemplate {
    name: String,
    source: String,
    env: Environment<'static>,
    special_tokens: Map<String, Value>,
    has_generation_blocks: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("name", &self.name)
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

impl ChatTemplate {
    /// Compile `source`; `name` says where it came from in errors (`file: key`), and
    /// `special_tokens` are the tokenizer's (`bos_token`, `eos_token`, `pad_token`, ...), passed
    /// to the template as transformers passes its `special_tokens_map`.
    pub fn new<K: Into<String>, V: Into<String>>(
        name: impl Into<String>,
        source: &str,
        special_tokens: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Self> {
        let name = name.into();
        let original = source.to_string();
        let (source, has_generation_blocks) = rewrite_generation_blocks(source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<JinjaValue, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| {
            chrono::Local::now().format(&format).to_string()
        });
        env.add_filter("tojson", tojson);
        env.add_filter("_generation_", |body: String| {
            format!("{GENERATION_START}{body}{GENERATION_END}")
        });
        env.add_template_owned("chat_template", source)
            .map_err(|e| ModelError::ChatTemplate {
                template: name.clone(),
                message: None,
                reason: describe(&e),
            })?;
        let special_tokens = special_tokens
            .into_iter()
            .map(|(k, v)| (k.into(), Value::String(v.into())))
            .collect();
        Ok(Self {
            name,
            source: original,
            env,
            special_tokens,
            has_generation_blocks,
        })
    }

    /// Where the template came from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The template's text, as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The special token `name` (`"eos_token"`, ...) the template is rendered with.
    pub fn special_token(&self, name: &str) -> Option<&str> {
        self.special_tokens.get(name).and_then(Value::as_str)
    }

    /// Whether the template marks the assistant's text with `{% generation %}` blocks.
    pub fn has_generation_blocks(&self) -> bool {
        self.has_generation_blocks
    }

    /// Render `messages` (`apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`).
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let options = RenderOptions {
            add_generation_prompt,
            ..RenderOptions::default()
        };
        Ok(self.render_with(messages, &options)?.text)
    }

    /// Render `messages` with extra variables, recording the `{% generation %}` spans.
    ///
    /// An error names the message that was being rendered: the shortest prefix of the
    /// conversation that fails the same way.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
    ) -> Result<Rendered> {
        if self.has_generation_blocks
            && let Some(i) = messages.iter().position(ChatMessage::has_marker_chars)
        {
            return Err(self.error(
                Some(i),
                "the content holds the noncharacters U+FDD0 / U+FDD1, which mark generation \
                 blocks; remove them"
                    .into(),
            ));
        }
        match self.render_raw(messages, options) {
            Ok(text) => Ok(split_generation(&text)),
            Err(e) => {
                let reason = describe(&e);
                let message = self.failing_message(messages, options, &reason);
                Err(self.error(message, reason))
            }
        }
    }

    fn render_raw(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
    ) -> std::result::Result<String, Error> {
        let template = self.env.get_template("chat_template")?;
        let mut variables = self.special_tokens.clone();
        variables.insert("tools".into(), Value::Null);
        variables.insert("documents".into(), Value::Null);
        variables.extend(options.variables.clone());
        let messages: Vec<Value> = messages.iter().map(normalize).collect();
        template.render(context! {
            messages => messages,
            add_generation_prompt => options.add_generation_prompt,
            ..JinjaValue::from_serialize(&variables)
        })
    }

    /// The index of the message whose rendering fails with `reason`: the shortest prefix
    /// that fails the same way (none when only the generation prompt fails).
    fn failing_message(
        &self,
        messages: &[ChatMessage],
        options: &RenderOptions,
        reason: &str,
    ) -> Option<usize> {
        let plain = RenderOptions {
            add_generation_prompt: false,
            variables: options.variables.clone(),
        };
        (1..=messages.len()).find_map(|k| match self.render_raw(&messages[..k], &plain) {
            Err(e) if describe(&e) == reason => Some(k - 1),
            _ => None,
        })
    }

    fn error(&self, message: Option<usize>, reason: String) -> ModelError {
        ModelError::ChatTemplate {
            template: self.name.clone(),
            message,
            reason,
        }
    }
}

/// A message as transformers hands it to the template (`_normalize_chat_messages` in
/// `chat_template_utils.py`): fields that are null are left out, and reasoning given as any of
/// `reasoning_content`, `thinking` or `reasoning` is also under the first two names, since
/// templates read one or the other.
fn normalize(message: &ChatMessage) -> Value {
    let mut map = Map::new();
    map.insert("role".into(), Value::String(message.role.clone()));
    if !message.content.is_null() {
        map.insert("content".into(), message.content.clone());
    }
    for (k, v) in &message.extra {
        if !v.is_null() {
            map.insert(k.clone(), v.clone());
        }
    }
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| map.get(*k).cloned());
    if let Some(reasoning) = reasoning {
        let mut aliased = Map::new();
        aliased.insert("thinking".into(), reasoning.clone());
        aliased.extend(map);
        aliased.insert("reasoning_content".into(), reasoning);
        map = aliased;
    }
    Value::Object(map)
}

/// A minijinja error as one line: the template's own message (`raise_exception`, exactly as
/// transformers reports it), else the error with its template line.
fn describe(e: &Error) -> String {
    if let (ErrorKind::InvalidOperation, Some(detail)) = (e.kind(), e.detail()) {
        return detail.to_string();
    }
    let mut text = e.to_string();
    if let Some(line) = e.line()
        && !text.contains("line ")
    {
        text.push_str(&format!(" (template line {line})"));
    }
    text
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`.
fn tojson(
    value: JinjaValue,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<String, Error> {
    let json: Value = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let indent = match kwargs.get::<Option<JinjaValue>>("indent")? {
        Some(v) if v.is_number() => Some(" ".repeat(usize::try_from(v).unwrap_or(0))),
        Some(v) => v.as_str().map(str::to_string),
        None => None,
    };
    let mut style = PyJsonStyle::new(indent);
    if let Some(separators) = kwargs.get::<Option<Vec<String>>>("separators")?
        && let [item, key] = separators.as_slice()
    {
        style.item_separator = item.clone();
        style.key_separator = key.clone();
    }
    style.sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.get::<Option<bool>>("ensure_ascii")?;
    kwargs.assert_all_used()?;
    Ok(dumps(&json, &style))
}

/// `{% generation %}` / `{% endgeneration %}` (a Jinja2 extension tag in transformers) as a
/// filter block, which minijinja has: same whitespace control, same trimming.
fn rewrite_generation_blocks(source: &str) -> (String, bool) {
    let open = regex::Regex::new(r"\{%([-+]?)\s*generation\s*([-+]?)%\}").expect("valid regex");
    let close = regex::Regex::new(r"\{%([-+]?)\s*endgeneration\s*([-+]?)%\}").expect("valid regex");
    if !open.is_match(source) {
        return (source.to_string(), false);
    }
    let source = open.replace_all(source, "{%${1} filter _generation_ ${2}%}");
    let source = close.replace_all(&source, "{%${1} endfilter ${2}%}");
    (source.into_owned(), true)
}

/// Strip the generation markers, keeping where they were.
fn split_generation(text: &str) -> Rendered {
    if !text.contains(GENERATION_START) {
        return Rendered {
            text: text.to_string(),
            generation: Vec::new(),
        };
    }
    let mut out = String::with_capacity(text.len());
    let mut generation = Vec::new();
    let mut start = None;
    for c in text.chars() {
        match c {
            GENERATION_START => start = Some(out.len()),
            GENERATION_END => {
                if let Some(s) = start.take() {
                    generation.push(s..out.len());
                }
            }
            c => out.push(c),
        }
    }
    Rendered {
        text: out,
        generation,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> ChatMessage {
        ChatMessage::new("user", text)
    }

    #[test]
    fn raise_exception_names_the_message() {
        let t = ChatTemplate::new(
            "t",
            "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}\
             {{ raise_exception('roles must alternate') }}{% endif %}{{ m.content }}{% endfor %}",
            [("eos_token", "</s>")],
        )
        .unwrap();
        let messages = [
            user("a"),
            ChatMessage::new("assistant", "b"),
            user("c"),
            user("d"),
        ];
        let err = t.render(&messages, false).unwrap_err();
        match err {
            ModelError::ChatTemplate {
                message, reason, ..
            } => {
                assert_eq!(message, Some(3));
                assert!(reason.starts_with("roles must alternate"), "{reason}");
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn generation_blocks_are_recorded_and_trimmed_like_jinja() {
        let t = ChatTemplate::new(
            "t",
            "{% for m in messages %}{% if m.role == 'assistant' %}A: {% generation %}\n{{ m.content }}!{% endgeneration %}\n{% else %}U: {{ m.content }}\n{% endif %}{% endfor %}",
            [("eos_token", "</s>")],
        )
        .unwrap();
        let r = t
            .render_with(
                &[user("hi"), ChatMessage::new("assistant", "yo")],
                &RenderOptions::default(),
            )
            .unwrap();
        assert_eq!(r.text, "U: hi\nA: yo!");
        assert_eq!(&r.text[r.generation[0].clone()], "yo!");
    }

    #[test]
    fn loop_controls_python_methods_and_syntax_errors() {
        let t = ChatTemplate::new(
            "t",
            "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}{{ m.content.strip().upper() }}{% endfor %}",
            [("bos_token", "<s>")],
        )
        .unwrap();
        assert_eq!(
            t.render(&[user(" a "), user("b"), user("c")], false)
                .unwrap(),
            "AC"
        );
        let err = ChatTemplate::new("bad.jinja", "{% for %}", [("bos_token", "<s>")]).unwrap_err();
        assert!(
            err.to_string().starts_with("chat template bad.jinja: "),
            "{err}"
        );
    }

    #[test]
    fn a_runaway_template_runs_out_of_fuel() {
        let t = ChatTemplate::new(
            "t",
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            [("bos_token", "<s>")],
        )
        .unwrap();
        assert!(t.render(&[], false).is_err());
    }
}
