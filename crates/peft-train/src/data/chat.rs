//! Conversational rows (`{"messages": [{"role", "content"}, ...]}`, the OpenAI / TRL format):
//! checked, rendered with the model's chat template and tokenized, the loss on the
//! assistant's tokens only (TRL's `assistant_only_loss`).

use peft_models::chat::{ChatMessage, ChatTemplate, RenderOptions, encode_chat};
use serde_json::Value;

use super::read::json_type as kind;

/// Roles a conversation may hold (OpenAI's, as the published templates know them).
pub const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// The messages of a `messages` value, checked: an array of objects with a known `role` and a
/// `content` (a string or a list of parts; `null` only for an assistant turn with
/// `tool_calls`), not empty, with at least one assistant turn when `need_assistant` (a training
/// row has nothing to learn without one). The error says what is wrong and where.
pub fn parse_messages(value: &Value, need_assistant: bool) -> Result<Vec<ChatMessage>, String> {
    let Value::Array(items) = value else {
        return Err(format!(
            "`messages` must be an array of {{\"role\", \"content\"}} objects, found {}",
            kind(value)
        ));
    };
    if items.is_empty() {
        return Err("empty conversation: `messages` holds no message".into());
    }
    let mut messages = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(fields) = item else {
            return Err(format!(
                "message {i} must be an object, found {}",
                kind(item)
            ));
        };
        let role = match fields.get("role") {
            None | Some(Value::Null) => return Err(format!("message {i} has no `role`")),
            Some(Value::String(r)) => r.clone(),
            Some(v) => {
                return Err(format!(
                    "message {i}: `role` must be a string, found {}",
                    kind(v)
                ));
            }
        };
        if !ROLES.contains(&role.as_str()) {
            return Err(format!(
                "message {i}: unknown role `{role}`; roles are {}",
                ROLES.join(", ")
            ));
        }
        match fields.get("content") {
            Some(Value::String(_) | Value::Array(_)) => {}
            None | Some(Value::Null) if fields.contains_key("tool_calls") => {}
            None | Some(Value::Null) => {
                return Err(format!("message {i} ({role}) has no `content`"));
            }
            Some(v) => {
                return Err(format!(
                    "message {i}: `content` must be a string or a list of parts, found {}",
                    kind(v)
                ));
            }
        }
        let message: ChatMessage =
            serde_json::from_value(item.clone()).map_err(|e| format!("message {i}: {e}"))?;
        messages.push(message);
    }
    if need_assistant && !messages.iter().any(|m| m.role == "assistant") {
        return Err("no assistant turn: a training conversation needs one to learn from".into());
    }
    Ok(messages)
}

/// A conversation as `(input_ids, labels, shortened)`: the template's rendering, tokenized;
/// labels are the ids on the assistant's tokens ([`IGNORE_INDEX`](super::IGNORE_INDEX)
/// elsewhere) or on every token without `assistant_only`; at most `max_length` tokens, cut as
/// [`encode_chat`] cuts (the longest system / user message first, keeping every turn).
pub fn encode_conversation(
    template: &ChatTemplate,
    tokenizer: &peft_models::HfTokenizer,
    messages: &[ChatMessage],
    max_length: usize,
    assistant_only: bool,
) -> peft_models::Result<(Vec<i64>, Vec<i64>, bool)> {
    let encoding = encode_chat(
        template,
        tokenizer,
        messages,
        &RenderOptions::default(),
        Some(max_length),
    )?;
    let labels = encoding
        .ids
        .iter()
        .zip(&encoding.assistant_mask)
        .map(|(&id, &mine)| {
            if mine || !assistant_only {
                id
            } else {
                super::IGNORE_INDEX
            }
        })
        .collect();
    Ok((encoding.ids, labels, encoding.truncated))
}
