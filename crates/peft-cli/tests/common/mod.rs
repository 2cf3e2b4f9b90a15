//! Helpers shared by the CLI tests: the binary, its output, and tiny model folders with a
//! word-level tokenizer.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::json;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn burn_peft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_burn-peft"));
    c.env("HF_HUB_OFFLINE", "1");
    c
}

pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn bad_input(out: &Output, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(2), "{}", text(out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{}", text(out));
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "missing `{needle}` in:\n{}",
            text(out)
        );
    }
}

/// A copy of a tiny model folder with a word-level `tokenizer.json` over its 128 ids
/// (`[PAD]`, `w1` ... `w127`), so the text subcommands can run on it.
pub fn model_with_tokenizer(dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for file in ["config.json", "model.safetensors", "generation_config.json"] {
        let from = fixtures().join("models").join(name).join(file);
        if from.is_file() {
            std::fs::copy(&from, to.join(file)).unwrap();
        }
    }
    let mut vocab = serde_json::Map::new();
    vocab.insert("[PAD]".into(), 0.into());
    for i in 1..128 {
        vocab.insert(format!("w{i}"), i.into());
    }
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "[PAD]", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[PAD]"}
    });
    std::fs::write(to.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    to
}

/// A sentence of `n` word tokens.
pub fn sentence(n: usize, seed: usize) -> String {
    (0..n)
        .map(|k| format!("w{}", 1 + (seed * 13 + k * 7) % 127))
        .collect::<Vec<_>>()
        .join(" ")
}
