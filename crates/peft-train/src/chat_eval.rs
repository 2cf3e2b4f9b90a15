//! Generative evaluation of conversations: each test conversation's last assistant turn is the
//! reference; the model answers the conversation before it (rendered with the chat template,
//! greedy), and the reply is scored by exact match and by contains match after normalization.

use std::path::Path;

use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use peft_core::nn::ForwardContext;
use peft_models::chat::{ChatMessage, ChatTemplate, RenderOptions};
use peft_models::{GenerationConfig, HfModel, HfTokenizer, generate_batch};
use serde::Serialize;

use crate::data::DataError;
use crate::data::chat::parse_messages;

/// A test conversation: the messages before the reference reply, and the reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Conversation {
    /// The 1-based line of the file it was read from.
    pub line: usize,
    /// What the model answers.
    pub prompt: Vec<ChatMessage>,
    /// The reference answer (the conversation's last assistant turn).
    pub reference: String,
}

/// The conversations of a JSON Lines file (`field` of each row; TRL's `messages`), each ending
/// with the assistant turn to compare against. Errors name the file and line.
pub fn load_conversations(path: &Path, field: &str) -> Result<Vec<Conversation>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        file: path.to_path_buf(),
        source,
    })?;
    let malformed = |line: usize, reason: String| DataError::Malformed {
        file: path.to_path_buf(),
        line,
        reason,
    };
    let mut conversations = Vec::new();
    for (i, row) in text.lines().enumerate() {
        let line = i + 1;
        if row.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(row.trim_start_matches('\u{feff}'))
            .map_err(|e| malformed(line, format!("invalid JSON: {e}")))?;
        let messages = value
            .get(field)
            .ok_or_else(|| {
                let found = value
                    .as_object()
                    .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
                    .unwrap_or_default();
                malformed(
                    line,
                    format!("missing field `{field}` (fields found: {found})"),
                )
            })
            .and_then(|m| {
                parse_messages(m, true)
                    .map_err(|r| malformed(line, format!("field `{field}`: {r}")))
            })?;
        let last = messages.len() - 1;
        if messages[last].role != "assistant" {
            return Err(malformed(
                line,
                format!(
                    "field `{field}`: the last message is `{}`; an evaluation conversation ends \
                     with the assistant turn to compare against",
                    messages[last].role
                ),
            ));
        }
        let reference = messages[last].text().ok_or_else(|| {
            malformed(
                line,
                format!("field `{field}`: the last assistant turn has no text"),
            )
        })?;
        conversations.push(Conversation {
            line,
            prompt: messages[..last].to_vec(),
            reference,
        });
    }
    if conversations.is_empty() {
        return Err(DataError::Empty {
            file: path.to_path_buf(),
        });
    }
    Ok(conversations)
}

/// Lowercase, surrounding whitespace, and trailing `.`, quotes and backticks removed.
///
/// ```
/// assert_eq!(peft_train::chat_eval::normalize("  `Games`.\n"), "games");
/// ```
pub fn normalize(text: &str) -> String {
    let trimmed = text
        .trim()
        .trim_end_matches(['.', '"', '\'', '`'])
        .trim_start_matches(['"', '\'', '`'])
        .trim();
    trimmed.to_lowercase()
}

/// Whether the normalized `reference` appears in the normalized `reply` as a whole word.
pub fn contains_match(reply: &str, reference: &str) -> bool {
    let (reply, reference) = (normalize(reply), normalize(reference));
    if reference.is_empty() {
        return false;
    }
    let word = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    reply.match_indices(&reference).any(|(at, _)| {
        !word(reply[..at].chars().next_back())
            && !word(reply[at + reference.len()..].chars().next())
    })
}

/// One scored reply.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatPrediction {
    /// The line of the test file.
    pub line: usize,
    /// The reference answer.
    pub reference: String,
    /// The model's reply (special tokens and the stop token left out).
    pub reply: String,
    /// Normalized reply equals normalized reference.
    pub exact: bool,
    /// Normalized reference appears in the normalized reply as a word.
    pub contains: bool,
}

/// Scores over a test set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatEvalReport {
    /// Conversations scored.
    pub examples: usize,
    /// Fraction of exact matches.
    pub exact_match: f64,
    /// Fraction of contains matches.
    pub contains_match: f64,
    /// Per conversation.
    pub predictions: Vec<ChatPrediction>,
}

/// How to generate the replies.
#[derive(Debug, Clone)]
pub struct ChatEvalConfig {
    /// New tokens per reply at most.
    pub max_new_tokens: usize,
    /// Conversations generated together.
    pub batch_size: usize,
    /// Ids that end a reply (the model's end of sequence; the template's `eos_token` is added).
    pub eos_token_ids: Vec<i64>,
    /// Show a progress bar.
    pub progress: bool,
}

/// Answer each conversation greedily with `model` (its active adapters) and score the replies.
pub fn evaluate_chat(
    model: &HfModel,
    template: &ChatTemplate,
    tokenizer: &HfTokenizer,
    conversations: &[Conversation],
    config: &ChatEvalConfig,
    device: &Device,
) -> peft_models::Result<ChatEvalReport> {
    let mut eos = config.eos_token_ids.clone();
    if let Some(id) = template
        .special_token("eos_token")
        .and_then(|t| tokenizer.token_to_id(t))
    {
        eos.push(i64::from(id));
    }
    let generation = GenerationConfig {
        max_new_tokens: config.max_new_tokens,
        temperature: 0.0,
        eos_token_ids: eos.clone(),
        pad_token_id: i64::from(tokenizer.pad_id()),
        ..GenerationConfig::default()
    };
    let prompts = conversations
        .iter()
        .map(|c| {
            let options = RenderOptions {
                add_generation_prompt: true,
                ..RenderOptions::default()
            };
            let text = template.render_with(&c.prompt, &options)?.text;
            Ok(tokenizer.encode_plain(&text)?.0)
        })
        .collect::<peft_models::Result<Vec<Vec<i64>>>>()?;
    let bar = if config.progress {
        let bar = ProgressBar::new(conversations.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} replies  [{elapsed_precise} < {eta_precise}]",
            )
            .expect("static template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut predictions = Vec::with_capacity(conversations.len());
    let batch = config.batch_size.max(1);
    for (chunk, convs) in prompts.chunks(batch).zip(conversations.chunks(batch)) {
        let rows = generate_batch(
            model,
            chunk,
            &ForwardContext::default(),
            &generation,
            device,
        )?;
        for ((row, prompt), conv) in rows.iter().zip(chunk).zip(convs) {
            let new: Vec<i64> = row[prompt.len()..]
                .iter()
                .copied()
                .take_while(|t| !eos.contains(t))
                .collect();
            let reply = tokenizer.decode(&new)?;
            predictions.push(ChatPrediction {
                line: conv.line,
                exact: normalize(&reply) == normalize(&conv.reference),
                contains: contains_match(&reply, &conv.reference),
                reference: conv.reference.clone(),
                reply,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let n = predictions.len().max(1) as f64;
    Ok(ChatEvalReport {
        examples: predictions.len(),
        exact_match: predictions.iter().filter(|p| p.exact).count() as f64 / n,
        contains_match: predictions.iter().filter(|p| p.contains).count() as f64 / n,
        predictions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_rules() {
        assert!(contains_match("The section is games.", "Games"));
        assert!(!contains_match("minigames", "games"));
        assert_eq!(normalize("'net'"), "net");
        assert!(!contains_match("anything", ""));
    }
}
