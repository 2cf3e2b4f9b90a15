//! The tokenizer a GGUF file describes (`tokenizer.ggml.*`), built as transformers builds it
//! (`integrations/gguf/gguf_tokenizer_mapping.py`), and its chat template.
//!
//! transformers 5 (`AutoTokenizer.from_pretrained(folder, gguf_file=NAME)`) builds it in two
//! stages, and so do we, step by step, because the order in which tokens are added decides the
//! ids of those the vocabulary lacks:
//!
//! 1. `convert_gguf_tokenizer`: a *builder* class, chosen by `tokenizer.ggml.model` and
//!    `general.architecture` (`select_tokenizer_builder`), is handed the vocabulary and merges:
//!    `GPT2Tokenizer` (byte-level BPE, `gpt2`), `LlamaTokenizer` (SentencePiece BPE, `llama`),
//!    the same with a normalizer in place of `Metaspace` (`phi3_tokenizer`), or
//!    `GemmaTokenizer` (`gemma_tokenizer`). Its `__init__` sets the normalizer, pre-tokenizer
//!    and decoder, and `TokenizersBackend.__init__` adds the class's default special tokens.
//!    Then `add_gguf_special_tokens` adds the control tokens (type 3) as special tokens and the
//!    user-defined ones (type 4) as plain added tokens, and `set_split_regex` puts the split
//!    regex of `GGUF_PRE_TOKENIZER_SPLITS` in front of a byte-level pre-tokenizer.
//! 2. The class `AutoTokenizer` picks for the file's model type (`TokenizersBackend`,
//!    `GemmaTokenizer` or `Qwen2Tokenizer`) takes that backend tokenizer: its
//!    `TokenizersBackend.__init__` adds the file's BOS / EOS / UNK / PAD tokens (and Gemma's
//!    `<mask>`) as special tokens where they are not yet added tokens, and
//!    `update_post_processor` writes the template that puts BOS / EOS around a text
//!    (`tokenizer.ggml.add_bos_token`, default true for `llama` vocabularies, and
//!    `add_eos_token`).
//!
//! Like transformers, we ignore `tokenizer.ggml.add_space_prefix` (no builder reads it) and
//! `precompiled_charsmap`. Not read: the `t5` (Unigram) and `gemma4` tokenizer models. Where a
//! broken file would make transformers fail or guess (an id past the token list, merges that
//! are not pairs, scores or token types not one per token) this is a typed error.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PaddingParams, SplitDelimiterBehavior, Tokenizer};

use super::reader::{GgufFile, GgufValue};
use crate::error::Result;
use crate::tokenizer::HfTokenizer;

/// SentencePiece's word boundary marker.
const SPIECE_UNDERLINE: &str = "\u{2581}";

/// llama.cpp's token types (`gguf.TokenType`) that transformers reads.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The tokenizer of `file`, equal to transformers' `AutoTokenizer.from_pretrained(dir,
/// gguf_file=...)`: same vocabulary, merges, added tokens (with the same ids), normalizer,
/// pre-tokenizer, post-processor and decoder, so the same ids for every text.
///
/// Reads `tokenizer.ggml.model` `gpt2` (byte-level BPE) and `llama` (SentencePiece BPE, with
/// the Phi-3 and Gemma variants `general.architecture` selects); any other model, a file
/// without tokens, and a special token id past the end of the token list are
/// [`ModelError::Gguf`](crate::ModelError::Gguf) errors.
pub fn tokenizer_from_gguf(file: &GgufFile) -> Result<HfTokenizer> {
    let meta = Meta::read(file)?;
    let tokenizer = build(file, &meta)?;
    HfTokenizer::from_tokenizer(tokenizer, &file.path)
}

/// The special tokens of `file` as a chat template sees them (`bos_token`, `eos_token`,
/// `unk_token`, `pad_token`: the strings of the `tokenizer.ggml.*_token_id` tokens).
pub fn special_tokens(file: &GgufFile) -> Result<Vec<(String, String)>> {
    let meta = Meta::read(file)?;
    Ok([
        ("bos_token", meta.bos),
        ("eos_token", meta.eos),
        ("unk_token", meta.unk),
        ("pad_token", meta.pad),
    ]
    .into_iter()
    .filter_map(|(name, token)| Some((name.to_string(), token?)))
    .collect())
}

/// `tokenizer.chat_template` of `file`, if it has one.
pub fn chat_template(file: &GgufFile) -> Option<String> {
    file.get("tokenizer.chat_template")
        .and_then(GgufValue::as_str)
        .map(str::to_string)
}

/// The class transformers hands the vocabulary to (`select_tokenizer_builder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Builder {
    /// `byte_level_tokenizer` -> `GPT2Tokenizer` (`tokenizer.ggml.model` = `gpt2`).
    ByteLevel,
    /// `sentencepiece_tokenizer` -> `LlamaTokenizer` (`llama`).
    SentencePiece,
    /// `phi3_tokenizer`: `LlamaTokenizer` with the prefix space from a normalizer (`llama`
    /// under architecture `phi3`, `GGUF_SENTENCEPIECE_BUILDERS`).
    Phi3,
    /// `gemma_tokenizer` -> `GemmaTokenizer` (`llama` under `gemma`, `gemma2`, `gemma3`).
    Gemma,
}

/// The class `AutoTokenizer` loads the file with (`TOKENIZER_MAPPING_NAMES` of the model type
/// the architecture maps to); it only matters for what its `__init__` adds to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outer {
    /// `TokenizersBackend` (llama, mistral, phi3 and every type without a class of its own).
    Backend,
    /// `GemmaTokenizer`: passes `mask_token="<mask>"`, which the file cannot override.
    Gemma,
    /// `Qwen2Tokenizer` (`models/qwen2/tokenization_qwen2.py`): adds its special tokens once
    /// more, as special, after `__init__`.
    Qwen2,
}

fn select(file: &GgufFile, arch: &str, model: Option<&str>) -> Result<(Builder, Outer)> {
    // `select_tokenizer_builder`: the architecture picks a SentencePiece variant, the
    // tokenizer model the rest.
    let builder = match (model, arch) {
        (Some("llama"), "gemma" | "gemma2" | "gemma3") => Builder::Gemma,
        (Some("llama"), "phi3") => Builder::Phi3,
        (Some("llama"), _) => Builder::SentencePiece,
        (Some("gpt2"), _) => Builder::ByteLevel,
        (Some(other), _) => {
            return Err(file.error(format!(
                "tokenizer model `{other}` (`tokenizer.ggml.model`) is not read here; read: \
                 gpt2 (byte-level BPE) and llama (SentencePiece BPE, also as the phi3 and \
                 gemma/gemma2/gemma3 variants)"
            )));
        }
        (None, _) => {
            return Err(file.error(
                "no `tokenizer.ggml.model` in the metadata: the file describes no tokenizer",
            ));
        }
    };
    // `models/auto/tokenization_auto.py`: gemma* -> GemmaTokenizer, qwen2/qwen3(_moe) ->
    // Qwen2Tokenizer, llama / mistral / phi3 -> TokenizersBackend.
    let outer = match arch {
        "gemma" | "gemma2" | "gemma3" => Outer::Gemma,
        "qwen2" | "qwen2moe" | "qwen3" | "qwen3moe" => Outer::Qwen2,
        _ => Outer::Backend,
    };
    Ok((builder, outer))
}

/// The `tokenizer.ggml.*` metadata, checked (`get_gguf_tokenizer`).
#[derive(Debug)]
struct Meta {
    arch: String,
    model: Option<String>,
    pre: Option<String>,
    tokens: Vec<String>,
    scores: Option<Vec<f64>>,
    types: Option<Vec<i64>>,
    merges: Option<Vec<(String, String)>>,
    bos: Option<String>,
    eos: Option<String>,
    unk: Option<String>,
    pad: Option<String>,
    add_bos: Option<bool>,
    add_eos: Option<bool>,
}

impl Meta {
    fn read(file: &GgufFile) -> Result<Self> {
        let arch = file
            .get("general.architecture")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| file.error("no `general.architecture` in the metadata"))?
            .to_string();
        let model = string(file, "tokenizer.ggml.model")?;
        let pre = string(file, "tokenizer.ggml.pre")?;
        let tokens = strings(file, "tokenizer.ggml.tokens")?
            .ok_or_else(|| file.error("no `tokenizer.ggml.tokens` in the metadata"))?;
        if tokens.is_empty() {
            return Err(file.error("`tokenizer.ggml.tokens` is empty"));
        }
        if u32::try_from(tokens.len()).is_err() {
            return Err(file.error(format!(
                "`tokenizer.ggml.tokens` holds {} tokens, more than a u32 id can number",
                tokens.len()
            )));
        }
        let scores = array(
            file,
            "tokenizer.ggml.scores",
            tokens.len(),
            GgufValue::as_f64,
        )?;
        let types = array(file, "tokenizer.ggml.token_type", tokens.len(), as_i64)?;
        let merges = strings(file, "tokenizer.ggml.merges")?
            .map(|merges| {
                // `get_merges`: `tuple(merge.split(" "))`; tokenizers' BPE takes pairs only.
                merges
                    .into_iter()
                    .enumerate()
                    .map(|(i, merge)| {
                        let mut parts = merge.split(' ');
                        match (parts.next(), parts.next(), parts.next()) {
                            (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                            _ => Err(file.error(format!(
                                "`tokenizer.ggml.merges`[{i}] = {merge:?} is not two tokens \
                                 separated by one space"
                            ))),
                        }
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        // `get_gguf_tokenizer`: `tokenizer["tokens"][token_id]` for each special token id.
        let special = |key: &str| -> Result<Option<String>> {
            let key = format!("tokenizer.ggml.{key}");
            let Some(value) = file.get(&key) else {
                return Ok(None);
            };
            let id = value
                .as_u64()
                .ok_or_else(|| file.error(format!("`{key}` = {value:?} is not a token id")))?;
            usize::try_from(id)
                .ok()
                .and_then(|id| tokens.get(id))
                .cloned()
                .map(Some)
                .ok_or_else(|| {
                    file.error(format!(
                        "`{key}` = {id} is past the end of the {} tokens of \
                         `tokenizer.ggml.tokens`",
                        tokens.len()
                    ))
                })
        };
        let bos = special("bos_token_id")?;
        let eos = special("eos_token_id")?;
        let unk = special("unknown_token_id")?;
        let pad = special("padding_token_id")?;
        let add_bos = flag(file, "tokenizer.ggml.add_bos_token")?;
        let add_eos = flag(file, "tokenizer.ggml.add_eos_token")?;
        Ok(Self {
            arch,
            model,
            pre,
            tokens,
            scores,
            types,
            merges,
            bos,
            eos,
            unk,
            pad,
            add_bos,
            add_eos,
        })
    }

    /// The token types, paired with the tokens (`zip(tokens, token_type or ())`).
    fn typed(&self) -> impl Iterator<Item = (&String, i64)> {
        self.tokens.iter().zip(self.types.iter().flatten().copied())
    }
}

fn as_i64(value: &GgufValue) -> Option<i64> {
    match value {
        GgufValue::Int(v) => Some(*v),
        GgufValue::UInt(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

fn string(file: &GgufFile, key: &str) -> Result<Option<String>> {
    file.get(key)
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| file.error(format!("`{key}` is not a string")))
        })
        .transpose()
}

fn flag(file: &GgufFile, key: &str) -> Result<Option<bool>> {
    file.get(key)
        .map(|v| {
            // transformers takes the value's truth: a bool, or a number as llama.cpp never
            // writes one.
            v.as_bool()
                .or_else(|| v.as_f64().map(|x| x != 0.0))
                .ok_or_else(|| file.error(format!("`{key}` is not a bool")))
        })
        .transpose()
}

fn strings(file: &GgufFile, key: &str) -> Result<Option<Vec<String>>> {
    let Some(value) = file.get(key) else {
        return Ok(None);
    };
    let items = value
        .as_array()
        .ok_or_else(|| file.error(format!("`{key}` is not an array")))?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| file.error(format!("`{key}`[{i}] is not a string")))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// An array of one value per token. transformers `zip`s these with the tokens, which would
/// silently drop the tail of a longer list; a file whose lists disagree is broken, so that is
/// an error here.
fn array<T>(
    file: &GgufFile,
    key: &str,
    len: usize,
    get: impl Fn(&GgufValue) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(value) = file.get(key) else {
        return Ok(None);
    };
    let items = value
        .as_array()
        .ok_or_else(|| file.error(format!("`{key}` is not an array")))?;
    if items.len() != len {
        return Err(file.error(format!(
            "`{key}` holds {} values for the {len} tokens of `tokenizer.ggml.tokens`",
            items.len()
        )));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            get(v).ok_or_else(|| file.error(format!("`{key}`[{i}] = {v:?} is not a number")))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// GPT-2's byte alphabet (`convert_slow_tokenizer.bytes_to_unicode`): printable bytes stand
/// for themselves, the others for 256, 257, ... in byte order.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (byte, slot) in table.iter_mut().enumerate() {
        let printable = matches!(byte, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        let code = if printable {
            byte as u32
        } else {
            next += 1;
            next - 1
        };
        // 0..=0xFF and 256..=323 are all scalar values.
        *slot = char::from_u32(code).unwrap_or('\0');
    }
    table
}

/// Python's `str.isspace`, which `str.strip()` strips (`gemma_tokenizer`).
fn is_python_space(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | '\u{1c}'..='\u{20}'
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// `tokenization_utils_base.generate_merges(vocab, vocab_scores)` with `vocab = {token:
/// index}` and `vocab_scores = dict(zip(tokens, scores))`, as `get_merges` calls it: every split
/// of a token into two tokens, each token's splits ordered by the ids of their halves, then all
/// sorted best score first, then longer left half, then longer right half (lengths in
/// characters); Python's sort is stable, so ties keep that order. A token listed twice has the
/// id and score of its last entry and the place of its first (Python dicts).
fn generate_merges(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let mut vocab: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, token) in tokens.iter().enumerate() {
        vocab.insert(token, i);
    }
    let mut order: Vec<(&str, f64)> = Vec::with_capacity(tokens.len());
    let mut place: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (token, &score) in tokens.iter().zip(scores) {
        match place.entry(token) {
            Entry::Occupied(at) => order[*at.get()].1 = score,
            Entry::Vacant(at) => {
                at.insert(order.len());
                order.push((token, score));
            }
        }
    }
    // (left, right, score, chars of left, chars of right)
    let mut merges: Vec<(&str, &str, f64, usize, usize)> = Vec::new();
    for (merge, score) in order {
        let start = merges.len();
        let chars = merge.chars().count();
        for (n, (at, _)) in merge.char_indices().enumerate().skip(1) {
            let (left, right) = merge.split_at(at);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                merges.push((left, right, score, n, chars - n));
            }
        }
        merges[start..].sort_by_key(|m| (vocab.get(m.0), vocab.get(m.1)));
    }
    // `sorted(..., reverse=True)` is stable: a descending comparison on a stable sort. `+ 0.0`
    // makes -0.0 equal to 0.0 as in Python (`total_cmp` orders them); NaN scores, which
    // Python cannot order either, sort first.
    merges.sort_by(|a, b| {
        (b.2 + 0.0)
            .total_cmp(&(a.2 + 0.0))
            .then(b.3.cmp(&a.3))
            .then(b.4.cmp(&a.4))
    });
    merges
        .into_iter()
        .map(|(l, r, ..)| (l.to_string(), r.to_string()))
        .collect()
}

/// `get_merges`: the file's merges, or the ones its vocabulary implies (`tokens` as the builder
/// spells them, `scores` aligned with them).
fn merges(
    file: &GgufFile,
    meta: &Meta,
    tokens: &[String],
    scores: Option<&[f64]>,
) -> Result<Vec<(String, String)>> {
    if let Some(merges) = &meta.merges {
        return Ok(merges.clone());
    }
    let scores = scores.ok_or_else(|| {
        file.error("no `tokenizer.ggml.merges` and no `tokenizer.ggml.scores` to derive them from")
    })?;
    Ok(generate_merges(tokens, scores))
}

/// `{token: index}`: a token listed twice keeps its last id (a Python dict).
fn vocab<'a>(tokens: impl Iterator<Item = std::borrow::Cow<'a, str>>) -> Vocab {
    let mut vocab = Vocab::default();
    for (i, token) in tokens.enumerate() {
        // `Meta::read` checked that every index fits a u32.
        vocab.insert(token.into_owned(), i as u32);
    }
    vocab
}

fn bpe(
    file: &GgufFile,
    vocab: Vocab,
    merges: Vec<(String, String)>,
    configure: impl FnOnce(tokenizers::models::bpe::BpeBuilder) -> tokenizers::models::bpe::BpeBuilder,
) -> Result<BPE> {
    configure(BPE::builder().vocab_and_merges(vocab, merges))
        .build()
        .map_err(|e| file.error(format!("building the BPE model: {e}")))
}

fn replace(file: &GgufFile, pattern: &str, content: &str) -> Result<Replace> {
    Replace::new(pattern, content).map_err(|e| file.error(format!("building the tokenizer: {e}")))
}

/// `GPT2Tokenizer.__init__` (`models/gpt2/tokenization_gpt2.py`) on the vocabulary of
/// `byte_level_tokenizer`: a token already spelled in the byte alphabet is kept, any other is
/// respelled from its UTF-8 bytes. The merges come from the file as it spells them.
fn byte_level(file: &GgufFile, meta: &Meta) -> Result<Tokenizer> {
    let table = bytes_to_unicode();
    let alphabet: HashSet<char> = table.iter().copied().collect();
    let vocab = vocab(meta.tokens.iter().map(|t| {
        if t.chars().all(|c| alphabet.contains(&c)) {
            std::borrow::Cow::Borrowed(t.as_str())
        } else {
            std::borrow::Cow::Owned(t.bytes().map(|b| table[b as usize]).collect())
        }
    }));
    let merges = merges(file, meta, &meta.tokens, meta.scores.as_deref())?;
    // BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
    // fuse_unk=False)
    let model = bpe(file, vocab, merges, |b| {
        b.continuing_subword_prefix(String::new())
            .end_of_word_suffix(String::new())
            .fuse_unk(false)
    })?;
    let mut tokenizer = Tokenizer::new(model);
    // pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// `LlamaTokenizer.__init__` (`models/llama/tokenization_llama.py`) on the vocabulary of
/// `sentencepiece_tokenizer`: BPE with byte fallback and no unknown token, `Metaspace` with
/// `prepend_scheme="first"` (`add_prefix_space` defaults to true and `legacy` to false:
/// `_get_prepend_scheme`), no normalizer, and a decoder that undoes both and strips the
/// leading space.
fn llama(file: &GgufFile, meta: &Meta) -> Result<Tokenizer> {
    let vocab = vocab(meta.tokens.iter().map(|t| t.as_str().into()));
    let merges = merges(file, meta, &meta.tokens, meta.scores.as_deref())?;
    let model = bpe(file, vocab, merges, |b| {
        b.fuse_unk(true).byte_fallback(true)
    })?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(None::<NormalizerWrapper>);
    tokenizer.with_pre_tokenizer(Some(Metaspace::new(
        '\u{2581}',
        PrependScheme::First,
        false,
    )));
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        DecoderWrapper::Replace(replace(file, SPIECE_UNDERLINE, " ")?),
        DecoderWrapper::ByteFallback(ByteFallback::default()),
        DecoderWrapper::Fuse(Fuse::default()),
        DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
    ])));
    Ok(tokenizer)
}

/// `gemma_tokenizer` then `GemmaTokenizer.__init__` (`models/gemma/tokenization_gemma.py`): a
/// token of two or more whitespace characters (`" " in t and not t.strip()`) is respelled as
/// that many `▁`; merges rebuilt from the vocabulary are ordered by position in the file, not
/// score; BPE with byte fallback and `<unk>`, spaces replaced by `▁` in a normalizer, split
/// after each space.
fn gemma(file: &GgufFile, meta: &Meta) -> Result<Tokenizer> {
    let tokens: Vec<String> = meta
        .tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.chars().all(is_python_space) {
                SPIECE_UNDERLINE.repeat(t.chars().count())
            } else {
                t.clone()
            }
        })
        .collect();
    let vocab = vocab(tokens.iter().map(|t| t.as_str().into()));
    let positions: Vec<f64> = (0..tokens.len()).map(|i| -(i as f64)).collect();
    let merges = merges(file, meta, &tokens, Some(&positions))?;
    let model = bpe(file, vocab, merges, |b| {
        b.fuse_unk(true)
            .unk_token("<unk>".to_string())
            .byte_fallback(true)
    })?;
    let mut tokenizer = Tokenizer::new(model);
    let split = Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false)
        .map_err(|e| file.error(format!("building the tokenizer: {e}")))?;
    tokenizer.with_pre_tokenizer(Some(split));
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        DecoderWrapper::Replace(replace(file, SPIECE_UNDERLINE, " ")?),
        DecoderWrapper::ByteFallback(ByteFallback::default()),
        DecoderWrapper::Fuse(Fuse::default()),
    ])));
    tokenizer.with_normalizer(Some(replace(file, " ", SPIECE_UNDERLINE)?));
    Ok(tokenizer)
}

/// What `TokenizersBackend.__init__` (`tokenization_utils_tokenizers.py`) does with the named
/// special tokens (in `SPECIAL_TOKENS_ATTRIBUTES` order: bos, eos, unk, sep, pad, cls, mask):
/// each one that is not yet an added token is added, once, as `AddedToken(t, special=True)`
/// (not normalized), taking its vocabulary id or, absent from the vocabulary, the next free one.
fn add_named_specials(tokenizer: &mut Tokenizer, named: &[&str]) {
    let added: HashSet<String> = tokenizer
        .get_added_tokens_decoder()
        .into_values()
        .map(|t| t.content)
        .collect();
    let mut queue: Vec<AddedToken> = Vec::new();
    for &name in named {
        if !added.contains(name) && !queue.iter().any(|t| t.content == name) {
            queue.push(AddedToken::from(name, true));
        }
    }
    if !queue.is_empty() {
        tokenizer.add_tokens(&queue);
    }
}

/// `update_post_processor` (`tokenization_utils_tokenizers.py`): the template, written as
/// transformers writes it (`"<s>:0 $A:0"`), with BOS / EOS where asked for and known.
fn post_processor(
    file: &GgufFile,
    tokenizer: &Tokenizer,
    bos: Option<&str>,
    eos: Option<&str>,
) -> Result<TemplateProcessing> {
    let mut single = String::new();
    let mut special = Vec::new();
    if let Some(bos) = bos {
        single.push_str(&format!("{bos}:0 "));
    }
    single.push_str("$A:0");
    if let Some(eos) = eos {
        single.push_str(&format!(" {eos}:0"));
    }
    let mut pair = single.clone();
    if let Some(bos) = bos {
        pair.push_str(&format!(" {bos}:1"));
    }
    pair.push_str(" $B:1");
    if let Some(eos) = eos {
        pair.push_str(&format!(" {eos}:1"));
    }
    for token in [bos, eos].into_iter().flatten() {
        let id = tokenizer.token_to_id(token).ok_or_else(|| {
            file.error(format!("special token {token:?} is not in the vocabulary"))
        })?;
        special.push((token.to_string(), id));
    }
    let err = |e: String| file.error(format!("building the post-processor: {e}"));
    TemplateProcessing::builder()
        .try_single(single.as_str())
        .map_err(err)?
        .try_pair(pair.as_str())
        .map_err(err)?
        .special_tokens(special)
        .build()
        .map_err(|e| file.error(format!("building the post-processor: {e}")))
}

/// `GGUF_PRE_TOKENIZER_SPLITS` (`gguf_tokenizer_mapping.py`): the split regex of the
/// vocabularies llama.cpp names in `tokenizer.ggml.pre` whose merges were learned on it.
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    // `models/qwen2/tokenization_qwen2.py` and `models/qwen3_5/tokenization_qwen3_5.py`
    // `PRETOKENIZE_REGEX`.
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN35: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => return None,
    })
}

fn build(file: &GgufFile, meta: &Meta) -> Result<Tokenizer> {
    let (builder, outer) = select(file, &meta.arch, meta.model.as_deref())?;

    // Stage 1, `convert_gguf_tokenizer`: the builder class's `__init__` ...
    let (mut tokenizer, class_specials): (Tokenizer, &[&str]) = match builder {
        // GPT2Tokenizer's unk / bos / eos default to `<|endoftext|>`.
        Builder::ByteLevel => (byte_level(file, meta)?, &["<|endoftext|>"]),
        // LlamaTokenizer: bos `<s>`, eos `</s>`, unk `<unk>`.
        Builder::SentencePiece | Builder::Phi3 => (llama(file, meta)?, &["<s>", "</s>", "<unk>"]),
        // GemmaTokenizer: bos, eos, unk, pad, mask.
        Builder::Gemma => (
            gemma(file, meta)?,
            &["<bos>", "<eos>", "<unk>", "<pad>", "<mask>"],
        ),
    };
    // ... whose `TokenizersBackend.__init__` sets a post-processor adding nothing (no
    // `add_bos_token` given) and adds the class's default special tokens.
    let template = post_processor(file, &tokenizer, None, None)?;
    tokenizer.with_post_processor(Some(template));
    add_named_specials(&mut tokenizer, class_specials);
    if builder == Builder::Phi3 {
        // `phi3_tokenizer`: Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer.
        tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new(SPIECE_UNDERLINE.to_string())),
            NormalizerWrapper::Replace(replace(file, " ", SPIECE_UNDERLINE)?),
        ])));
        tokenizer.with_pre_tokenizer(None::<PreTokenizerWrapper>);
    }

    // `add_gguf_special_tokens`: control tokens as special tokens -- in a byte-level vocabulary
    // only those spelled in the byte alphabet (another is a llama.cpp mislabel) ...
    let alphabet: Option<HashSet<char>> =
        (builder == Builder::ByteLevel).then(|| bytes_to_unicode().into_iter().collect());
    let control: Vec<AddedToken> = meta
        .typed()
        .filter(|&(token, kind)| {
            kind == CONTROL
                && alphabet
                    .as_ref()
                    .is_none_or(|a| token.chars().all(|c| a.contains(&c)))
        })
        .map(|(token, _)| AddedToken::from(token.clone(), true))
        .collect();
    if !control.is_empty() {
        tokenizer.add_special_tokens(&control);
    }
    // ... and user-defined tokens the vocabulary holds (as the file spells them) as added,
    // not special, tokens.
    let known = tokenizer.get_vocab(true);
    let user_defined: Vec<AddedToken> = meta
        .typed()
        .filter(|&(token, kind)| kind == USER_DEFINED && known.contains_key(token))
        .map(|(token, _)| AddedToken::from(token.clone(), false).normalized(false))
        .collect();
    if !user_defined.is_empty() {
        tokenizer.add_tokens(&user_defined);
    }

    // `set_split_regex`: Split(regex, "isolated") + ByteLevel(add_prefix_space=False,
    // use_regex=False), whatever the builder.
    if let Some(regex) = meta.pre.as_deref().and_then(split_regex) {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| file.error(format!("building the split regex: {e}")))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])));
    }

    // Stage 2: the class `AutoTokenizer` picked, given the file's special tokens
    // (`get_gguf_tokenizer`'s `tokenizer_config`).
    let mut named: Vec<&str> = [&meta.bos, &meta.eos, &meta.unk, &meta.pad]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if outer == Outer::Gemma {
        // GemmaTokenizer passes `mask_token="<mask>"`; the file cannot set one.
        named.push("<mask>");
    }
    add_named_specials(&mut tokenizer, &named);
    if outer == Outer::Qwen2 {
        // `Qwen2Tokenizer.__init__`: `self.add_tokens([AddedToken(t, special=True) for t in
        // self.all_special_tokens])` (named tokens, unique, in order).
        let mut all: Vec<AddedToken> = Vec::new();
        for &name in &named {
            if !all.iter().any(|t| t.content == name) {
                all.push(AddedToken::from(name, true));
            }
        }
        if !all.is_empty() {
            tokenizer.add_tokens(&all);
        }
    }
    // `get_gguf_tokenizer`: a `llama` vocabulary adds BOS unless the file says otherwise
    // (llama.cpp's default); `update_post_processor` drops BOS / EOS the file does not name.
    let add_bos = meta
        .add_bos
        .unwrap_or(meta.model.as_deref() == Some("llama"));
    let add_eos = meta.add_eos.unwrap_or(false);
    let bos = meta.bos.as_deref().filter(|_| add_bos);
    let eos = meta.eos.as_deref().filter(|_| add_eos);
    let template = post_processor(file, &tokenizer, bos, eos)?;
    tokenizer.with_post_processor(Some(template));

    // transformers' `pad_token_id` (the id of the file's padding token); `HfTokenizer`
    // takes its padding id from here and turns padding off.
    if let Some(pad) = meta.pad.as_deref()
        && let Some(pad_id) = tokenizer.token_to_id(pad)
    {
        tokenizer.with_padding(Some(PaddingParams {
            pad_id,
            pad_token: pad.to_string(),
            ..PaddingParams::default()
        }));
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let table = bytes_to_unicode();
        assert_eq!(table[b'A' as usize], 'A');
        assert_eq!(table[b' ' as usize], '\u{120}'); // Ġ
        assert_eq!(table[b'\n' as usize], '\u{10a}'); // Ċ
        assert_eq!(table[0xAD], '\u{143}');
        let distinct: HashSet<char> = table.into_iter().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn merges_follow_score_then_lengths() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc", "ab"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // "ab" is listed twice: its place is the first, its score the last (-0.5).
        let scores = [0.0, 0.0, 0.0, -3.0, -1.0, -2.0, -0.5];
        let merges = generate_merges(&tokens, &scores);
        let merges: Vec<(&str, &str)> = merges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        // abc splits as (a, bc) and (ab, c), ordered by the ids of their halves (0 < 6), then
        // the longer left half first among equal scores.
        assert_eq!(merges, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }
}
