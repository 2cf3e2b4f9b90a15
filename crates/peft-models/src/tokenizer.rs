//! `tokenizer.json` through the `tokenizers` crate (pure Rust, `fancy-regex`).

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::{ModelError, Result};

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
        let mut inner =
            tokenizers::Tokenizer::from_file(file).map_err(|e| ModelError::Tokenizer {
                file: file.to_path_buf(),
                reason: e.to_string(),
            })?;
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

    /// The id of a token, if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token ids of one text (with the tokenizer's special tokens), truncated to `max_len`.
    pub fn encode(&self, text: &str, pair: Option<&str>, max_len: usize) -> Result<Encoding> {
        let enc = match pair {
            Some(p) => self.inner.encode((text, p), true),
            None => self.inner.encode(text, true),
        }
        .map_err(|e| ModelError::Tokenizer {
            file: self.file.clone(),
            reason: e.to_string(),
        })?;
        let n = enc.get_ids().len().min(max_len);
        Ok(Encoding {
            ids: enc.get_ids()[..n].iter().map(|&i| i as i64).collect(),
            type_ids: enc.get_type_ids()[..n].iter().map(|&i| i as i64).collect(),
        })
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
