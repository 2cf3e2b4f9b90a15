//! Rows to examples: tokenization with the tokenizer's special tokens, prompt/completion
//! joining and loss masking.

use std::path::Path;

use peft_models::HfTokenizer;
use peft_models::chat::ChatTemplate;

use super::read::Row;
use super::{DataConfig, DataError, IGNORE_INDEX, TaskKind};

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids, special tokens included, at most `max_length` of them.
    pub input_ids: Vec<i64>,
    /// Segment ids (0 for the first text, 1 for the pair; all 0 for causal LM).
    pub token_type_ids: Vec<i64>,
    /// The class id (classification).
    pub label: Option<usize>,
    /// Per-token targets (causal LM), aligned with `input_ids` (not shifted: the loss shifts);
    /// [`IGNORE_INDEX`] where no loss is taken.
    pub labels: Option<Vec<i64>>,
    /// The 1-based line of the data file the example was read from (0 when it was not read
    /// from a file), so per-example results can be traced back to their row; for a packed
    /// row, the line of its first example.
    pub line: usize,
    /// For a row built by [`pack`](super::pack): the lengths of the examples in it, in order
    /// (they are kept apart in the forward). Empty for a single example.
    pub segments: Vec<usize>,
    /// The image of an image classification example (preprocessed, channels first); its
    /// `input_ids` are then empty.
    pub image: Option<std::sync::Arc<super::images::Image>>,
}

impl Example {
    /// An image classification example: `image` (preprocessed) with class `label`, read from
    /// line `line` of its file (0 for an image file).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use peft_train::data::{Example, Image};
    /// let image = Image { channels: 1, height: 2, width: 2, values: vec![0.0; 4] };
    /// let e = Example::image(Arc::new(image), 3, 0);
    /// assert_eq!((e.label, e.input_ids.len()), (Some(3), 0));
    /// ```
    pub fn image(image: std::sync::Arc<super::images::Image>, label: usize, line: usize) -> Self {
        Self {
            input_ids: Vec::new(),
            token_type_ids: Vec::new(),
            label: Some(label),
            labels: None,
            line,
            segments: Vec::new(),
            image: Some(image),
        }
    }

    /// A classification example: `input_ids` (one segment) with class `label`.
    ///
    /// ```
    /// let e = peft_train::data::Example::classification(vec![5, 9, 2], 1);
    /// assert_eq!((e.label, e.token_type_ids.len()), (Some(1), 3));
    /// ```
    pub fn classification(input_ids: Vec<i64>, label: usize) -> Self {
        Self {
            token_type_ids: vec![0; input_ids.len()],
            input_ids,
            label: Some(label),
            labels: None,
            line: 0,
            segments: Vec::new(),
            image: None,
        }
    }

    /// A causal-LM example that learns every token of `input_ids` (the loss shifts them).
    ///
    /// ```
    /// let e = peft_train::data::Example::causal_lm(vec![5, 9, 2]);
    /// assert_eq!(e.labels.as_deref(), Some(&[5, 9, 2][..]));
    /// ```
    pub fn causal_lm(input_ids: Vec<i64>) -> Self {
        Self {
            token_type_ids: vec![0; input_ids.len()],
            labels: Some(input_ids.clone()),
            input_ids,
            label: None,
            line: 0,
            segments: Vec::new(),
            image: None,
        }
    }
}

/// The special tokens a tokenizer wraps every single text in: `prefix text suffix`.
pub(super) struct Specials {
    prefix: Vec<i64>,
    suffix: Vec<i64>,
}

impl Specials {
    /// Found by encoding the empty text (only the special tokens) and a probe text.
    fn of(tok: &HfTokenizer) -> peft_models::Result<Self> {
        let empty = tok.encode("", None, usize::MAX)?.ids;
        for probe in ["a", "hello", "0", "."] {
            let ids = tok.encode(probe, None, usize::MAX)?.ids;
            if ids.len() <= empty.len() {
                continue;
            }
            for k in 0..=empty.len() {
                if ids.starts_with(&empty[..k]) && ids.ends_with(&empty[k..]) {
                    return Ok(Self {
                        prefix: empty[..k].to_vec(),
                        suffix: empty[k..].to_vec(),
                    });
                }
            }
        }
        Ok(Self {
            prefix: empty,
            suffix: Vec::new(),
        })
    }

    /// The tokens of a text without its special tokens.
    fn strip<'a>(&self, ids: &'a [i64]) -> &'a [i64] {
        let (p, s) = (self.prefix.len(), self.suffix.len());
        if ids.len() >= p + s && ids.starts_with(&self.prefix) && ids.ends_with(&self.suffix) {
            &ids[p..ids.len() - s]
        } else {
            ids
        }
    }
}

/// "missing field `x`; the row has: a, b (set the field names in `data`: text_field, ...)".
fn missing_field(field: &str, row: &Row) -> String {
    let found = row.field_names();
    format!(
        "missing field `{field}`; the row has {}: set the field names (`text_field`, \
         `label_field`, `prompt_field`, `completion_field`, `messages_field`; on the command \
         line `--text-field`, ...)",
        if found.is_empty() {
            "no fields".to_string()
        } else {
            format!(
                "fields {}",
                found
                    .iter()
                    .map(|f| format!("`{f}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    )
}

/// Turns rows into examples; the label stays raw until every row is read.
pub(super) struct Builder<'a> {
    pub(super) file: &'a Path,
    pub(super) task: TaskKind,
    pub(super) cfg: &'a DataConfig,
    pub(super) tok: &'a HfTokenizer,
    /// The model's chat template, for `messages` rows.
    pub(super) chat: Option<&'a ChatTemplate>,
    /// Conversations shortened to fit `max_length`.
    pub(super) shortened: usize,
    pub(super) specials: Option<Specials>,
    /// `(line, example, raw label)`.
    pub(super) rows: Vec<(usize, Example, Option<String>)>,
}

impl Builder<'_> {
    pub(super) fn malformed(&self, line: usize, reason: String) -> DataError {
        DataError::Malformed {
            file: self.file.to_path_buf(),
            line,
            reason,
        }
    }

    fn tokenizer_error(&self, line: usize, e: peft_models::ModelError) -> DataError {
        DataError::Tokenizer {
            file: self.file.to_path_buf(),
            line,
            reason: e.to_string(),
        }
    }

    fn required_text(&self, row: &Row, line: usize, field: &str) -> Result<String, DataError> {
        match row.text(field).map_err(|r| self.malformed(line, r))? {
            None => Err(self.malformed(line, missing_field(field, row))),
            Some(s) if s.trim().is_empty() => {
                Err(self.malformed(line, format!("field `{field}` is empty")))
            }
            Some(s) => Ok(s),
        }
    }

    pub(super) fn push(&mut self, row: Row, line: usize) -> Result<(), DataError> {
        let cfg = self.cfg;
        let max = cfg.max_length;
        match self.task {
            TaskKind::Classification => {
                let text = self.required_text(&row, line, &cfg.text_field)?;
                let pair = match &cfg.text_pair_field {
                    Some(f) => row
                        .text(f)
                        .map_err(|r| self.malformed(line, r))?
                        .filter(|s| !s.is_empty()),
                    None => None,
                };
                let label = row
                    .label(&cfg.label_field)
                    .map_err(|r| self.malformed(line, r))?
                    .ok_or_else(|| self.malformed(line, missing_field(&cfg.label_field, &row)))?;
                let enc = self
                    .tok
                    .encode(&text, pair.as_deref(), max)
                    .map_err(|e| self.tokenizer_error(line, e))?;
                let example = Example {
                    input_ids: enc.ids,
                    token_type_ids: enc.type_ids,
                    label: None,
                    labels: None,
                    line,
                    segments: Vec::new(),
                    image: None,
                };
                self.rows.push((line, example, Some(label)));
            }
            TaskKind::CausalLm if row.field(&cfg.messages_field).is_some() => {
                let value = row.field(&cfg.messages_field).expect("checked");
                let (ids, labels) = self.conversation(line, value)?;
                self.push_lm(line, ids, labels);
            }
            TaskKind::CausalLm => {
                let prompt = row
                    .text(&cfg.prompt_field)
                    .map_err(|r| self.malformed(line, r))?;
                let completion = row
                    .text(&cfg.completion_field)
                    .map_err(|r| self.malformed(line, r))?;
                let (ids, labels) = if prompt.is_some() || completion.is_some() {
                    let prompt = prompt.ok_or_else(|| {
                        self.malformed(
                            line,
                            format!(
                                "field `{}` without field `{}`",
                                cfg.completion_field, cfg.prompt_field
                            ),
                        )
                    })?;
                    let completion = self.required_text(&row, line, &cfg.completion_field)?;
                    self.prompt_completion(line, &prompt, &completion)?
                } else {
                    let text = self.required_text(&row, line, &cfg.text_field)?;
                    let ids = self
                        .tok
                        .encode(&text, None, max)
                        .map_err(|e| self.tokenizer_error(line, e))?
                        .ids;
                    (ids.clone(), ids)
                };
                self.push_lm(line, ids, labels);
            }
        }
        Ok(())
    }

    /// A causal-LM example: its ids and per-token targets.
    fn push_lm(&mut self, line: usize, ids: Vec<i64>, labels: Vec<i64>) {
        let example = Example {
            token_type_ids: vec![0; ids.len()],
            input_ids: ids,
            label: None,
            labels: Some(labels),
            line,
            segments: Vec::new(),
            image: None,
        };
        self.rows.push((line, example, None));
    }

    /// A `messages` row: checked, rendered with the chat template, the loss on the assistant's
    /// tokens (unless `assistant_only_loss` is off).
    fn conversation(
        &mut self,
        line: usize,
        value: &serde_json::Value,
    ) -> Result<(Vec<i64>, Vec<i64>), DataError> {
        let field = &self.cfg.messages_field;
        let messages = super::chat::parse_messages(value, true)
            .map_err(|r| self.malformed(line, format!("field `{field}`: {r}")))?;
        let template = self.chat.ok_or_else(|| {
            self.malformed(
                line,
                format!(
                    "a `{field}` row needs the model's chat template, and this model has none \
                     (no chat_template.jinja, no chat_template in tokenizer_config.json or the \
                     GGUF metadata): add one to the model folder, or use prompt / completion rows"
                ),
            )
        })?;
        let (ids, labels, shortened) = super::chat::encode_conversation(
            template,
            self.tok,
            &messages,
            self.cfg.max_length,
            self.cfg.assistant_only_loss,
        )
        .map_err(|e| self.malformed(line, e.to_string()))?;
        self.shortened += usize::from(shortened);
        Ok((ids, labels))
    }

    /// `prefix prompt completion suffix`, the loss on `completion suffix`, truncated.
    fn prompt_completion(
        &mut self,
        line: usize,
        prompt: &str,
        completion: &str,
    ) -> Result<(Vec<i64>, Vec<i64>), DataError> {
        if self.specials.is_none() {
            self.specials =
                Some(Specials::of(self.tok).map_err(|e| self.tokenizer_error(line, e))?);
        }
        let encode = |text: &str| {
            self.tok
                .encode(text, None, usize::MAX)
                .map(|e| e.ids)
                .map_err(|e| self.tokenizer_error(line, e))
        };
        let p = encode(prompt)?;
        let c = encode(completion)?;
        let sp = self.specials.as_ref().expect("set above");
        let head: Vec<i64> = sp.prefix.iter().chain(sp.strip(&p)).copied().collect();
        let tail: Vec<i64> = sp.strip(&c).iter().chain(&sp.suffix).copied().collect();
        let mut ids = head.clone();
        ids.extend(&tail);
        let mut labels = vec![IGNORE_INDEX; head.len()];
        labels.extend(&tail);
        ids.truncate(self.cfg.max_length);
        labels.truncate(self.cfg.max_length);
        Ok((ids, labels))
    }
}
