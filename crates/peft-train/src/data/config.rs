//! What to read: the data format, field names and token budget, and the task.

use serde::{Deserialize, Serialize};

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
    /// The field of a conversation (causal LM): `[{"role", "content"}, ...]` rendered with the
    /// model's chat template. Default `"messages"`.
    pub messages_field: String,
    /// For conversations: take the loss on the assistant's tokens only (TRL's
    /// `assistant_only_loss`). Default true.
    pub assistant_only_loss: bool,
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
            messages_field: "messages".into(),
            assistant_only_loss: true,
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
