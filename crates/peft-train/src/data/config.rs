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
    /// Images (image classification): the side they are resized to, instead of the model's
    /// `preprocessor_config.json` size (224 without one).
    pub image_size: Option<usize>,
    /// Images: the pixels of a pixel-CSV row, `[height, width]` or `[channels, height,
    /// width]` (default: a square single-channel image, MNIST's 28x28 for 784 pixels).
    pub image_shape: Option<Vec<usize>>,
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
            image_size: None,
            image_shape: None,
        }
    }
}

/// What the examples are for: the task a run config names (`model.task`), the data reader
/// reads for, and PEFT's `task_type` says. The model head that learns it, with its class count,
/// is [`peft_models::Task`].
///
/// Read from `classification` / `causal_lm`, the command line's `causal-lm`, or PEFT's
/// `SEQ_CLS` / `CAUSAL_LM`:
///
/// ```
/// use peft_train::data::TaskKind;
/// let kind: TaskKind = serde_json::from_str("\"CAUSAL_LM\"").unwrap();
/// assert_eq!(kind, TaskKind::CausalLm);
/// assert_eq!(TaskKind::default().peft_task_type(), "SEQ_CLS");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Sequence classification: one label per example.
    #[default]
    #[serde(alias = "seq_cls", alias = "SEQ_CLS", alias = "seq-cls")]
    Classification,
    /// Causal language modelling: next-token loss on (part of) the tokens.
    #[serde(alias = "causal-lm", alias = "CAUSAL_LM")]
    CausalLm,
}

impl TaskKind {
    /// PEFT's `task_type` for it: `SEQ_CLS` or `CAUSAL_LM`.
    pub fn peft_task_type(self) -> &'static str {
        match self {
            TaskKind::Classification => "SEQ_CLS",
            TaskKind::CausalLm => "CAUSAL_LM",
        }
    }
}
