//! `tokenizer.json` through the `tokenizers` crate (pure Rust, `fancy-regex`).

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use tokenizers::utils::truncation::{
    TruncationDirection, TruncationParams, TruncationStrategy, truncate_encodings,
};

use crate::error::{ModelError, Result};

/// The byte range `(start, end)` of the text a token came from.
pub type ByteSpan = (usize, usize);

/// A Hugging Face fast tokenizer.
#[derive(Clone)]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    file: PathBuf,
    pad_id: u32,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("file", &self.file)
            .finish()
    }
}

/// A padded batch, ready for a model.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[b, s]`.
    pub input_ids: Tensor<2, Int>,
    /// `[b, s]`, 1 for tokens, 0 for padding.
    pub attention_mask: Tensor<2, Int>,
    /// `[b, s]` segment ids.
    pub token_type_ids: Tensor<2, Int>,
}

impl HfTokenizer {
    /// Load `tokenizer.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Load a `tokenizer.json`.
    pub fn from_file(file: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(file).map_err(|e| ModelError::Tokenizer {
            file: file.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_tokenizer(inner, file)
    }

    /// A tokenizer built in memory (from a GGUF file's metadata, say); `source` names it in
    /// errors.
    pub fn from_tokenizer(mut inner: tokenizers::Tokenizer, source: &Path) -> Result<Self> {
        let file = source;
        let pad_id = inner
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| {
                ["[PAD]", "<pad>", "<|endoftext|>"]
                    .iter()
                    .find_map(|t| inner.token_to_id(t))
            })
            .unwrap_or(0);
        // Padding and truncation are ours (dynamic padding to the longest row, a caller-chosen
        // maximum); a tokenizer.json may carry fixed ones.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer {
                file: file.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            inner,
            file: file.to_path_buf(),
            pad_id,
        })
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The `tokenizers` tokenizer (to serialize it as `tokenizer.json`, say).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The id of a token, if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of one text, or of a pair, with the tokenizer's special tokens, truncated to
    /// at most `max_len` ids as transformers' `tokenizer(text, pair, truncation=True,
    /// max_length=max_len)` does: the special tokens are kept and the text is cut
    /// (`longest_first` for pairs: the longer part loses a token at a time), so a long text
    /// still ends with `[SEP]`. This is the tokenizers library's own truncation
    /// (`TokenizerImpl::post_process`), with the length limit chosen per call.
    ///
    /// `max_len` smaller than the number of special tokens is an error.
    pub fn encode(&self, text: &str, pair: Option<&str>, max_len: usize) -> Result<Encoding> {
        let err = |e: tokenizers::Error| ModelError::Tokenizer {
            file: self.file.clone(),
            reason: e.to_string(),
        };
        let first = self.inner.encode(text, false).map_err(err)?;
        let second = match pair {
            Some(p) => {
                let mut enc = self.inner.encode(p, false).map_err(err)?;
                // Encoded on its own it gets type id 0; as the second part of a pair it is 1
                // (tokenizers' `encode_single_sequence(pair, 1, ..)`).
                enc.set_type_ids(vec![1; enc.get_ids().len()]);
                Some(enc)
            }
            None => None,
        };
        let added = self.inner.get_post_processor().map_or(0, |p| {
            tokenizers::PostProcessor::added_tokens(p, second.is_some())
        });
        let budget = max_len.checked_sub(added).ok_or_else(|| ModelError::InvalidInput(format!(
            "max length {max_len} is shorter than the {added} special tokens this tokenizer adds \
             ({}); use a max length of at least {}",
            self.file.display(),
            added + 1
        )))?;
        let total = first.get_ids().len() + second.as_ref().map_or(0, |e| e.get_ids().len());
        let (first, second) = if total > budget {
            let params = TruncationParams {
                max_length: budget,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            };
            truncate_encodings(first, second, &params).map_err(err)?
        } else {
            (first, second)
        };
        let enc = self.inner.post_process(first, second, true).map_err(err)?;
        Ok(Encoding {
            ids: enc.get_ids().iter().map(|&i| i as i64).collect(),
            type_ids: enc.get_type_ids().iter().map(|&i| i as i64).collect(),
        })
    }

    /// Token ids of `text` with the byte range of `text` each came from, adding no special
    /// tokens (as `apply_chat_template` tokenizes a rendered conversation: the template
    /// writes the special tokens itself).
    pub fn encode_plain(&self, text: &str) -> Result<(Vec<i64>, Vec<ByteSpan>)> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer {
                file: self.file.clone(),
                reason: e.to_string(),
            })?;
        let ids = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        Ok((ids, enc.get_offsets().to_vec()))
    }

    /// How many special tokens the tokenizer adds around one text (`[CLS]`/`[SEP]`: 2,
    /// Llama's `<s>`: 1, GPT-2: 0), or around a pair.
    pub fn num_special_tokens(&self, pair: bool) -> usize {
        self.inner
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, pair))
    }

    /// Size of the tokenizer's vocabulary, added tokens included (the largest id plus one).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Decode ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner
            .decode(&ids, true)
            .map_err(|e| ModelError::Tokenizer {
                file: self.file.clone(),
                reason: e.to_string(),
            })
    }

    /// Encode and right-pad a batch of texts to its longest member.
    pub fn batch(&self, texts: &[&str], max_len: usize, device: &Device) -> Result<Batch> {
        let encodings = texts
            .iter()
            .map(|t| self.encode(t, None, max_len))
            .collect::<Result<Vec<_>>>()?;
        Ok(pad_batch(&encodings, self.pad_id as i64, device))
    }
}

/// One encoded text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// Token ids.
    pub ids: Vec<i64>,
    /// Segment ids.
    pub type_ids: Vec<i64>,
}

/// Right-pad encodings to the longest one.
pub fn pad_batch(encodings: &[Encoding], pad_id: i64, device: &Device) -> Batch {
    let b = encodings.len();
    let s = encodings
        .iter()
        .map(|e| e.ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut ids = vec![pad_id; b * s];
    let mut mask = vec![0i64; b * s];
    let mut types = vec![0i64; b * s];
    for (row, e) in encodings.iter().enumerate() {
        for (j, (&id, &t)) in e.ids.iter().zip(&e.type_ids).enumerate() {
            ids[row * s + j] = id;
            mask[row * s + j] = 1;
            types[row * s + j] = t;
        }
    }
    let t = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [b, s]), device);
    Batch {
        input_ids: t(ids),
        attention_mask: t(mask),
        token_type_ids: t(types),
    }
}
