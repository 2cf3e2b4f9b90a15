//! Generated tokens to text, with stop strings: text is released only once no stop string can
//! still start in it, so a stream never sends what a stop string later cuts off.

use std::sync::Arc;

use peft_models::HfTokenizer;

use crate::error::ApiError;

/// Decodes a growing list of generated tokens into text deltas.
pub struct TextStream {
    tokenizer: Option<Arc<HfTokenizer>>,
    stop: Vec<String>,
    ids: Vec<i64>,
    /// Bytes of the decoded text already released.
    sent: usize,
    stopped: bool,
}

/// What one more token released.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// New text (may be empty while text is held back).
    pub text: String,
    /// Whether a stop string was reached (the text ends before it).
    pub stopped: bool,
}

impl TextStream {
    /// A stream decoding with `tokenizer` (without one, text stays empty) and stopping before
    /// any of `stop`.
    pub fn new(tokenizer: Option<Arc<HfTokenizer>>, stop: Vec<String>) -> Self {
        Self {
            tokenizer,
            stop,
            ids: Vec::new(),
            sent: 0,
            stopped: false,
        }
    }

    fn decode(&self) -> Result<String, ApiError> {
        match &self.tokenizer {
            Some(t) => t
                .decode(&self.ids)
                .map_err(|e| ApiError::internal(e.to_string())),
            None => Ok(String::new()),
        }
    }

    /// Add a token; the text it releases.
    pub fn push(&mut self, token: i64) -> Result<Delta, ApiError> {
        if self.stopped {
            return Ok(Delta {
                stopped: true,
                ..Delta::default()
            });
        }
        self.ids.push(token);
        let text = self.decode()?;
        if let Some(at) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            self.stopped = true;
            let delta = text.get(self.sent..at).unwrap_or_default().to_string();
            self.sent = at.max(self.sent);
            return Ok(Delta {
                text: delta,
                stopped: true,
            });
        }
        let safe = text.len() - self.held_back(&text);
        let delta = text.get(self.sent..safe).unwrap_or_default().to_string();
        self.sent = safe.max(self.sent);
        Ok(Delta {
            text: delta,
            stopped: false,
        })
    }

    /// The text still held back, when generation ended without a stop string.
    pub fn finish(&mut self) -> Result<String, ApiError> {
        if self.stopped {
            return Ok(String::new());
        }
        let text = self.decode()?;
        let rest = text.get(self.sent..).unwrap_or_default().to_string();
        self.sent = text.len();
        Ok(rest)
    }

    /// Bytes at the end of `text` that may still become a stop string, or that end in an
    /// incomplete character (a byte-level BPE token decodes to U+FFFD until its rest comes).
    fn held_back(&self, text: &str) -> usize {
        let mut held = 0;
        for stop in &self.stop {
            // Every proper prefix of the stop string (the whole one was searched for already).
            for (i, _) in stop.char_indices().skip(1) {
                if text.ends_with(&stop[..i]) {
                    held = held.max(i);
                }
            }
        }
        let replacement = text.chars().rev().take_while(|c| *c == '\u{FFFD}').count();
        held.max(replacement * '\u{FFFD}'.len_utf8())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_possible_stop_strings() {
        let stream = TextStream::new(None, Vec::new());
        assert_eq!(stream.held_back("abc\u{FFFD}"), 3);
        let stream = TextStream::new(None, vec!["END".to_string()]);
        assert_eq!(stream.held_back("xxE"), 1);
        assert_eq!(stream.held_back("xxEN"), 2);
        assert_eq!(stream.held_back("xxEND"), 0);
        assert_eq!(stream.held_back("xxy"), 0);
    }
}
