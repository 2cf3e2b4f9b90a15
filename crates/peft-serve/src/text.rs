//! Generated tokens to text, with stop strings: text is released only once no stop string can
//! still start in it, so a stream never sends what a stop string later cuts off.
//!
//! Decoding is incremental, as in TGI and vLLM: each token decodes a short window (the tokens
//! since the last complete piece of text, one token before them for context), not the whole
//! text again, and stop strings are looked for only in the text not yet released. Decoding
//! everything on every token made a long generation quadratic.

use std::sync::Arc;

use peft_models::HfTokenizer;

use crate::error::ApiError;

/// Decodes a growing list of generated tokens into text deltas.
pub struct TextStream {
    tokenizer: Option<Arc<HfTokenizer>>,
    stop: Vec<String>,
    /// Tokens that end a generation (end of sequence, stop token ids): never text, even where
    /// the tokenizer does not mark them special (`</s>` would otherwise show as its literal).
    end_ids: Vec<i64>,
    ids: Vec<i64>,
    /// Start of the decode window: the token before the ones not yet turned into text, so a
    /// tokenizer that treats the first token of a sequence apart (a leading space dropped)
    /// decodes the window's new tokens as it would inside the whole text.
    prefix_offset: usize,
    /// Tokens already turned into text.
    read_offset: usize,
    /// The text so far.
    text: String,
    /// Bytes of `text` already released.
    sent: usize,
    stopped: bool,
    /// Token ids handed to the tokenizer so far (the decoding work done).
    decoded: usize,
}

/// What one more token released.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// New text (may be empty while text is held back).
    pub text: String,
    /// Whether a stop string was reached (the text ends before it).
    pub stopped: bool,
}

/// The most tokens decoded together while they make no complete text (a UTF-8 character is at
/// most 4 byte-level tokens; a run of tokens that decode to nothing is given up on).
const MAX_PENDING_TOKENS: usize = 8;

impl TextStream {
    /// A stream decoding with `tokenizer` (without one, text stays empty), stopping before
    /// any of `stop`, and leaving the tokens `end_ids` out of the text.
    pub fn new(tokenizer: Option<Arc<HfTokenizer>>, stop: Vec<String>, end_ids: Vec<i64>) -> Self {
        Self {
            tokenizer,
            stop,
            end_ids,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
            text: String::new(),
            sent: 0,
            stopped: false,
            decoded: 0,
        }
    }

    fn decode(&mut self, from: usize, to: usize) -> Result<String, ApiError> {
        let Some(tokenizer) = &self.tokenizer else {
            return Ok(String::new());
        };
        let ids = &self.ids[from..to];
        self.decoded += ids.len();
        tokenizer
            .decode(ids)
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// Turn the tokens after `read_offset` into text if they make complete characters (or
    /// whatever they make when `flush`).
    fn advance_text(&mut self, flush: bool) -> Result<(), ApiError> {
        if self.tokenizer.is_none() {
            return Ok(());
        }
        let before = self.decode(self.prefix_offset, self.read_offset)?;
        let after = self.decode(self.prefix_offset, self.ids.len())?;
        // A byte-level token may end inside a character (decoded as U+FFFD until its rest
        // comes): wait for it, unless nothing more will come. A window that stays incomplete
        // or empty (special tokens decode to nothing) is cut after MAX_PENDING_TOKENS tokens,
        // so each token decodes a bounded window and a long generation stays linear.
        let stuck = self.ids.len() - self.read_offset > MAX_PENDING_TOKENS;
        let complete = flush || stuck || !after.ends_with('\u{FFFD}');
        if complete
            && after.len() > before.len()
            && let Some(new) = after.get(before.len()..)
        {
            self.text.push_str(new);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        } else if stuck {
            self.prefix_offset = self.ids.len();
            self.read_offset = self.ids.len();
        }
        Ok(())
    }

    /// The first stop string in the text not yet released: where it starts. (Released text
    /// never holds the start of a stop string, see [`held_back`](Self::held_back).)
    fn find_stop(&self) -> Option<usize> {
        let unreleased = self.text.get(self.sent..)?;
        self.stop
            .iter()
            .filter_map(|s| unreleased.find(s.as_str()))
            .min()
            .map(|at| self.sent + at)
    }

    /// Release the text up to `end` (not below what is already released).
    fn release(&mut self, end: usize) -> String {
        let delta = self
            .text
            .get(self.sent..end)
            .unwrap_or_default()
            .to_string();
        self.sent = end.max(self.sent);
        delta
    }

    /// Add a token; the text it releases.
    pub fn push(&mut self, token: i64) -> Result<Delta, ApiError> {
        if self.stopped {
            return Ok(Delta {
                stopped: true,
                ..Delta::default()
            });
        }
        if self.end_ids.contains(&token) {
            return Ok(Delta::default());
        }
        self.ids.push(token);
        self.advance_text(false)?;
        if let Some(at) = self.find_stop() {
            self.stopped = true;
            return Ok(Delta {
                text: self.release(at),
                stopped: true,
            });
        }
        let safe = self.text.len() - self.held_back(&self.text);
        Ok(Delta {
            text: self.release(safe),
            stopped: false,
        })
    }

    /// The text still held back, when generation ended without a stop string (cut before a
    /// stop string the last tokens completed).
    pub fn finish(&mut self) -> Result<String, ApiError> {
        if self.stopped {
            return Ok(String::new());
        }
        self.advance_text(true)?;
        let end = self.find_stop().unwrap_or(self.text.len());
        Ok(self.release(end))
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

    /// A word-level tokenizer over `t0` … `t127` that joins words with spaces.
    fn words() -> Arc<HfTokenizer> {
        let dir = tempfile::tempdir().unwrap();
        let vocab: serde_json::Map<String, serde_json::Value> = (0..128)
            .map(|i| (format!("t{i}"), serde_json::json!(i)))
            .collect();
        let tokenizer = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
        });
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
        Arc::new(HfTokenizer::from_dir(dir.path()).unwrap())
    }

    /// Decoding is incremental: each token decodes a window of a few tokens, not the whole
    /// text again (which made a long generation quadratic), and the text is the same.
    #[test]
    fn decoding_work_grows_linearly_with_the_tokens() {
        let n = 600;
        let ids: Vec<i64> = (0..n).map(|i| 1 + (i * 7) % 120).collect();
        let mut stream = TextStream::new(Some(words()), vec!["t999".into()], Vec::new());
        let mut text = String::new();
        for &id in &ids {
            let delta = stream.push(id).unwrap();
            assert!(!delta.stopped);
            text.push_str(&delta.text);
        }
        text.push_str(&stream.finish().unwrap());
        assert_eq!(text, words().decode(&ids).unwrap());
        assert!(
            stream.decoded <= 8 * ids.len(),
            "{} token ids decoded for {} tokens",
            stream.decoded,
            ids.len()
        );
    }

    /// Tokens that decode to nothing (special tokens, skipped when decoding) do not make the
    /// decode window grow: the work per token stays bounded.
    #[test]
    fn tokens_that_decode_to_nothing_keep_the_window_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let tokenizer = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 1, "content": "<s>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
            "model": {"type": "WordLevel", "vocab": {"a": 0, "<s>": 1}, "unk_token": "a"}
        });
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
        let tokenizer = Arc::new(HfTokenizer::from_dir(dir.path()).unwrap());
        let mut stream = TextStream::new(Some(tokenizer), Vec::new(), Vec::new());
        let n = 2000;
        for _ in 0..n {
            assert_eq!(stream.push(1).unwrap().text, "");
        }
        assert_eq!(stream.push(0).unwrap().text, "a");
        assert!(
            stream.decoded <= 4 * MAX_PENDING_TOKENS * n,
            "{} token ids decoded for {n} tokens",
            stream.decoded
        );
    }

    /// A stop string is found across token boundaries, and nothing after it is released.
    #[test]
    fn stop_strings_span_tokens() {
        let mut stream = TextStream::new(Some(words()), vec!["t3 t4".into()], Vec::new());
        let mut text = String::new();
        for id in [1, 2, 3, 4, 5] {
            let delta = stream.push(id).unwrap();
            text.push_str(&delta.text);
            if delta.stopped {
                break;
            }
        }
        assert_eq!(text, "t1 t2 ");
    }

    /// An end-of-sequence token is never text, even where the tokenizer would decode it to
    /// its literal.
    #[test]
    fn end_tokens_are_not_text() {
        let mut stream = TextStream::new(Some(words()), Vec::new(), vec![9]);
        let mut text = String::new();
        for id in [1, 2, 9] {
            text.push_str(&stream.push(id).unwrap().text);
        }
        text.push_str(&stream.finish().unwrap());
        assert_eq!(text, "t1 t2");
    }

    #[test]
    fn holds_back_possible_stop_strings() {
        let stream = TextStream::new(None, Vec::new(), Vec::new());
        assert_eq!(stream.held_back("abc\u{FFFD}"), 3);
        let stream = TextStream::new(None, vec!["END".to_string()], Vec::new());
        assert_eq!(stream.held_back("xxE"), 1);
        assert_eq!(stream.held_back("xxEN"), 2);
        assert_eq!(stream.held_back("xxEND"), 0);
        assert_eq!(stream.held_back("xxy"), 0);
    }
}
