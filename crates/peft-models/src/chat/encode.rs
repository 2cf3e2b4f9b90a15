//! A conversation as token ids, with the assistant's tokens marked for assistant-only loss
//! (TRL's `assistant_only_loss`) and a length limit that keeps the template's structure.

use std::ops::Range;

use super::{ChatMessage, ChatTemplate, RenderOptions};
use crate::error::{ModelError, Result};
use crate::tokenizer::HfTokenizer;

/// A conversation as the model sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatEncoding {
    /// The token ids of the rendered conversation (no special tokens added beyond the
    /// template's own).
    pub ids: Vec<i64>,
    /// Per token: whether it is the assistant's (trained with assistant-only loss).
    pub assistant_mask: Vec<bool>,
    /// Whether the conversation was shortened to fit the length limit.
    pub truncated: bool,
}

/// Render and tokenize `messages`, marking the assistant's tokens.
///
/// The assistant's text is what the template's `{% generation %}` blocks render, as
/// transformers' `return_assistant_tokens_mask` takes it. A template without them (most
/// published ones) gets the turn-by-turn rule TRL and LLaMA-Factory use: assistant message
/// `i` owns the text from the end of the conversation up to `i` rendered with the generation
/// prompt to the end of the conversation up to and including `i`, so the end-of-turn tokens
/// are learned and the role header is not. A template whose earlier renders are not a prefix
/// of later ones (one that rewrites history) is an error that asks for generation blocks.
/// A token is the assistant's when its text overlaps the assistant's (transformers'
/// `return_assistant_tokens_mask`: a token that straddles the start counts).
///
/// With `max_len`, a longer conversation is shortened keeping the template's structure: the
/// longest system / user message loses text from its end (and again, while it is too long),
/// so every turn, role header and the assistant's answers stay; only when the assistant's
/// turns alone are too long is the end cut.
pub fn encode_chat(
    template: &ChatTemplate,
    tokenizer: &HfTokenizer,
    messages: &[ChatMessage],
    options: &RenderOptions,
    max_len: Option<usize>,
) -> Result<ChatEncoding> {
    let mut messages = messages.to_vec();
    let mut encoding = encode_once(template, tokenizer, &messages, options)?;
    let Some(max_len) = max_len else {
        return Ok(encoding);
    };
    for _ in 0..8 {
        let Some(overflow) = encoding.ids.len().checked_sub(max_len).filter(|&o| o > 0) else {
            return Ok(encoding);
        };
        if !shorten_longest_prompt(tokenizer, &mut messages, overflow)? {
            break;
        }
        encoding = encode_once(template, tokenizer, &messages, options)?;
        encoding.truncated = true;
    }
    if encoding.ids.len() > max_len {
        encoding.ids.truncate(max_len);
        encoding.assistant_mask.truncate(max_len);
        encoding.truncated = true;
    }
    Ok(encoding)
}

fn encode_once(
    template: &ChatTemplate,
    tokenizer: &HfTokenizer,
    messages: &[ChatMessage],
    options: &RenderOptions,
) -> Result<ChatEncoding> {
    let (text, spans) = assistant_spans(template, messages, options)?;
    let (ids, offsets) = tokenizer.encode_plain(&text)?;
    let mut assistant_mask = vec![false; ids.len()];
    for span in spans.iter().filter(|s| !s.is_empty()) {
        for (m, &(start, end)) in assistant_mask.iter_mut().zip(&offsets) {
            *m |= end > span.start && start < span.end;
        }
    }
    Ok(ChatEncoding {
        ids,
        assistant_mask,
        truncated: false,
    })
}

/// The rendered conversation and the byte ranges of the assistant's text.
fn assistant_spans(
    template: &ChatTemplate,
    messages: &[ChatMessage],
    options: &RenderOptions,
) -> Result<(String, Vec<Range<usize>>)> {
    let full = template.render_with(messages, options)?;
    if template.has_generation_blocks() {
        return Ok((full.text, full.generation));
    }
    let mut spans = Vec::new();
    let with_prompt = |n: usize, add_generation_prompt: bool| {
        let opts = RenderOptions {
            add_generation_prompt,
            variables: options.variables.clone(),
        };
        template.render_with(&messages[..n], &opts).map(|r| r.text)
    };
    for (i, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        let prompt = with_prompt(i, true)?;
        let turn = with_prompt(i + 1, false)?;
        if !turn.starts_with(&prompt) || !full.text.starts_with(&turn) {
            return Err(ModelError::ChatTemplate {
                template: template.name().to_string(),
                message: Some(i),
                reason: "the conversation rendered up to this assistant message is not a prefix \
                         of the whole conversation (the template rewrites earlier turns), so \
                         the assistant's tokens cannot be told apart; use a template with \
                         {% generation %} blocks"
                    .into(),
            });
        }
        spans.push(prompt.len()..turn.len());
    }
    Ok((full.text, spans))
}

/// Cut `overflow` tokens (and a little more, for the tokens a cut merges differently) from
/// the end of the longest non-assistant text message; false when there is nothing to cut.
fn shorten_longest_prompt(
    tokenizer: &HfTokenizer,
    messages: &mut [ChatMessage],
    overflow: usize,
) -> Result<bool> {
    let longest = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role != "assistant")
        .filter_map(|(i, m)| Some((i, m.content.as_str()?.len())))
        .filter(|&(_, len)| len > 0)
        .max_by_key(|&(_, len)| len);
    let Some((index, _)) = longest else {
        return Ok(false);
    };
    let content = messages[index]
        .content
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (ids, offsets) = tokenizer.encode_plain(&content)?;
    let keep = ids.len().saturating_sub(overflow + 1);
    let cut = offsets.get(keep).map_or(content.len(), |&(start, _)| start);
    let cut = (0..=cut.min(content.len()))
        .rev()
        .find(|&c| content.is_char_boundary(c))
        .unwrap_or(0);
    messages[index].content = serde_json::Value::String(content[..cut].to_string());
    Ok(true)
}
