//! The tokenizer of a GGUF file (`peft_models::gguf::tokenizer_from_gguf`) against
//! transformers' (`AutoTokenizer.from_pretrained(folder, gguf_file=NAME)`,
//! `tests/fixtures/gen/gguf_tokenizers.py`): the same ids for a few hundred varied texts (and a
//! few pairs), with the special tokens transformers adds by default, the same decoded text with
//! and without special tokens, and the same backend tokenizer (added tokens with their ids and
//! flags, normalizer, pre-tokenizer, post-processor, decoder, BPE settings, vocabulary and merge
//! sizes and samples). Files: the real SmolLM2-135M-Instruct (byte-level BPE, merges in the
//! file; `scripts/fetch-smollm2.sh`) and four tiny synthetic ones (SentencePiece BPE with merges
//! rebuilt from scores, its Phi-3 and Gemma variants, byte-level BPE with Qwen2's split regex).
//! Then the typed errors of broken files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use peft_models::ModelError;
use peft_models::gguf::{GgufFile, tokenizer_from_gguf};
use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> Value {
    let path = repo().join("tests/fixtures/gguf").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The backend tokenizer's JSON cut as the generator cuts it (`backend_summary`).
fn summary(json: &str) -> Value {
    let mut j: Value = serde_json::from_str(json).expect("tokenizer JSON");
    let model = j["model"].as_object_mut().expect("model");
    let mut vocab: Vec<(String, u64)> = model
        .remove("vocab")
        .and_then(|v| v.as_object().cloned())
        .expect("vocab")
        .into_iter()
        .map(|(t, i)| (t, i.as_u64().expect("id")))
        .collect();
    vocab.sort_by_key(|(_, i)| *i);
    let merges = model
        .remove("merges")
        .and_then(|m| m.as_array().cloned())
        .expect("merges");
    let step = |n: usize| (n / 40).max(1);
    model.insert("vocab_len".into(), vocab.len().into());
    model.insert(
        "vocab_sample".into(),
        vocab
            .iter()
            .step_by(step(vocab.len()))
            .map(|(t, i)| serde_json::json!([i, t]))
            .collect(),
    );
    model.insert("merges_len".into(), merges.len().into());
    model.insert(
        "merges_sample".into(),
        merges
            .iter()
            .enumerate()
            .step_by(step(merges.len()))
            .map(|(i, m)| serde_json::json!([i, m[0], m[1]]))
            .collect(),
    );
    j
}

/// Every file of `fixture` (GGUF files found by `locate`) against transformers; returns the
/// number of texts checked.
fn check(fixture_name: &str, locate: impl Fn(&str) -> PathBuf) -> usize {
    let fixture = fixture(fixture_name);
    let mut checked = 0;
    for f in fixture["files"].as_array().expect("files") {
        let name = f["gguf"].as_str().expect("gguf");
        let path = locate(name);
        let file = GgufFile::open(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let tokenizer = tokenizer_from_gguf(&file).unwrap_or_else(|e| panic!("{name}: {e}"));
        let inner = tokenizer.inner();

        assert_eq!(
            tokenizer.vocab_size() as u64,
            f["vocab_size"].as_u64().expect("vocab_size"),
            "{name}: vocabulary size (added tokens included)"
        );
        let ours = summary(&inner.to_string(false).expect("serialize"));
        for key in [
            "added_tokens",
            "normalizer",
            "pre_tokenizer",
            "post_processor",
            "decoder",
            "model",
        ] {
            assert_eq!(
                ours[key], f["backend"][key],
                "{name}: `{key}` of the backend tokenizer differs from transformers'"
            );
        }

        let mut differ = Vec::new();
        let cases = f["cases"].as_array().expect("cases");
        for case in cases {
            let text = case["text"].as_str().expect("text");
            let pair = case.get("pair").and_then(Value::as_str);
            let want: Vec<i64> = case["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_i64().expect("id"))
                .collect();
            let got = tokenizer
                .encode(text, pair, usize::MAX)
                .unwrap_or_else(|e| panic!("{name}: encoding {text:?}: {e}"))
                .ids;
            let ids: Vec<u32> = want.iter().map(|&i| i as u32).collect();
            let decoded = inner.decode(&ids, false).expect("decode");
            let decoded_skip = tokenizer.decode(&want).expect("decode");
            if got != want
                || decoded != case["decoded"].as_str().expect("decoded")
                || decoded_skip != case["decoded_skip"].as_str().expect("decoded_skip")
            {
                differ.push(format!(
                    "{text:?} (pair {pair:?}):\n  ids   {got:?}\n  want  {want:?}\n  \
                     decoded {decoded:?} / {:?}\n  skipping specials {decoded_skip:?} / {:?}",
                    case["decoded"], case["decoded_skip"]
                ));
            }
        }
        assert!(
            differ.is_empty(),
            "{name}: {} of {} texts differ from transformers:\n{}",
            differ.len(),
            cases.len(),
            differ.join("\n")
        );
        checked += cases.len();
    }
    checked
}

/// The real SmolLM2-135M-Instruct Q4_1 file, laid into the model cache by the fetch script
/// (offline after the first fetch; it prints the file's path).
fn smollm2() -> PathBuf {
    let script = repo().join("scripts/fetch-smollm2.sh");
    let out = Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.is_file(),
        "{} printed {}",
        script.display(),
        path.display()
    );
    path
}

#[test]
fn smollm2_gguf_tokenizer_matches_transformers() {
    let path = smollm2();
    let fixture = fixture("tokenizer_smollm2.json");
    let name = fixture["files"][0]["gguf"]
        .as_str()
        .expect("gguf")
        .to_string();
    assert_eq!(
        path.file_name().and_then(|n| n.to_str()),
        Some(name.as_str())
    );
    let checked = check("tokenizer_smollm2.json", |_| path.clone());
    assert!(checked >= 300, "{checked} texts");

    // The chat template travels with it.
    let file = GgufFile::open(&path).expect("open");
    let template = peft_models::gguf::chat_template(&file).expect("chat template");
    assert!(template.contains("<|im_start|>"), "{template}");
    // The file's padding token (`<|im_end|>`, id 2) is the padding id.
    let tokenizer = tokenizer_from_gguf(&file).expect("tokenizer");
    assert_eq!(tokenizer.pad_id(), 2);
}

#[test]
fn tiny_gguf_tokenizers_match_transformers() {
    let dir = repo().join("tests/fixtures/gguf");
    let checked = check("tokenizer_tiny.json", |name| dir.join(name));
    assert!(checked >= 4 * 150, "{checked} texts");
}

// ------------------------------------------------------------------------------------------
// Broken files
// ------------------------------------------------------------------------------------------

/// A metadata value of a GGUF written here.
enum Meta {
    U32(u32),
    Str(&'static str),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

/// A GGUF v3 file with `meta` and no tensors (`gguf.md`).
fn gguf(meta: &[(&str, Meta)]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        string(&mut out, key);
        match value {
            Meta::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            Meta::Strs(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for s in items {
                    string(&mut out, s);
                }
            }
            Meta::I32s(items) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for v in items {
                    out.extend(v.to_le_bytes());
                }
            }
        }
    }
    out.resize(out.len().next_multiple_of(32), 0);
    out
}

fn tokens() -> Meta {
    Meta::Strs(
        ["<unk>", "<s>", "</s>", "a", "b", "ab"]
            .map(String::from)
            .to_vec(),
    )
}

/// The `ModelError::Gguf` reason building the tokenizer of `meta` fails with.
fn gguf_error(meta: &[(&str, Meta)]) -> String {
    let path = Path::new("broken.gguf");
    let file = GgufFile::parse(path, Arc::new(gguf(meta))).expect("the container is valid");
    match tokenizer_from_gguf(&file) {
        Ok(_) => panic!("a tokenizer was built"),
        Err(ModelError::Gguf { file, reason }) => {
            assert_eq!(file, path);
            reason
        }
        Err(e) => panic!("not a GGUF error: {e:?}"),
    }
}

#[test]
fn gguf_tokenizer_errors_are_typed() {
    // The container writer is right: the same file with a good tokenizer builds.
    let good = gguf(&[
        ("general.architecture", Meta::Str("llama")),
        ("tokenizer.ggml.model", Meta::Str("llama")),
        ("tokenizer.ggml.tokens", tokens()),
        ("tokenizer.ggml.merges", Meta::Strs(vec!["a b".into()])),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
    ]);
    let file = GgufFile::parse(Path::new("good.gguf"), Arc::new(good)).expect("parse");
    let tokenizer = tokenizer_from_gguf(&file).expect("a good file builds");
    // `llama` adds BOS by default.
    assert_eq!(
        tokenizer.encode("ab", None, usize::MAX).unwrap().ids,
        [1, 5]
    );

    let reason = gguf_error(&[
        ("general.architecture", Meta::Str("bert")),
        ("tokenizer.ggml.model", Meta::Str("bert")),
        ("tokenizer.ggml.tokens", tokens()),
    ]);
    assert!(reason.contains("`bert`"), "{reason}");

    let reason = gguf_error(&[
        ("general.architecture", Meta::Str("llama")),
        ("tokenizer.ggml.model", Meta::Str("llama")),
    ]);
    assert!(reason.contains("tokenizer.ggml.tokens"), "{reason}");

    let reason = gguf_error(&[
        ("general.architecture", Meta::Str("llama")),
        ("tokenizer.ggml.model", Meta::Str("gpt2")),
        ("tokenizer.ggml.tokens", Meta::Strs(Vec::new())),
    ]);
    assert!(reason.contains("empty"), "{reason}");

    let reason = gguf_error(&[
        ("general.architecture", Meta::Str("llama")),
        ("tokenizer.ggml.model", Meta::Str("llama")),
        ("tokenizer.ggml.tokens", tokens()),
        ("tokenizer.ggml.merges", Meta::Strs(vec!["a b".into()])),
        ("tokenizer.ggml.bos_token_id", Meta::U32(6)),
    ]);
    assert!(
        reason.contains("bos_token_id") && reason.contains("past the end"),
        "{reason}"
    );

    // A token type list of the wrong length, merges naming unknown tokens, and a SentencePiece
    // vocabulary with neither merges nor scores to derive them from.
    let reason = gguf_error(&[
        ("general.architecture", Meta::Str("llama")),
        ("tokenizer.ggml.model", Meta::Str("llama")),
        ("tokenizer.ggml.tokens", tokens()),
        ("tokenizer.ggml.token_type", Meta::I32s(vec![2, 3, 3])),
    ]);
    assert!(reason.contains("token_type"), "{reason}");
    let reason = gguf_error(&[
        ("general.architecture", Meta::Str("llama")),
        ("tokenizer.ggml.model", Meta::Str("gpt2")),
        ("tokenizer.ggml.tokens", tokens()),
        ("tokenizer.ggml.merges", Meta::Strs(vec!["a c".into()])),
    ]);
    assert!(reason.contains("BPE"), "{reason}");
    let reason = gguf_error(&[
        ("general.architecture", Meta::Str("llama")),
        ("tokenizer.ggml.model", Meta::Str("llama")),
        ("tokenizer.ggml.tokens", tokens()),
    ]);
    assert!(reason.contains("scores"), "{reason}");
}
