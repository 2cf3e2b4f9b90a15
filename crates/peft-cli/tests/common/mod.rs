//! Helpers shared by the CLI tests: the binary, its output, a `serve` process, safetensors
//! reading, the real SmolLM2 GGUF, and tiny model folders with a word-level tokenizer.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

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

/// The real SmolLM2-135M-Instruct Q4_1 GGUF, laid by `scripts/fetch-smollm2.sh` (offline after
/// the first fetch).
pub fn smollm2() -> PathBuf {
    let script = fixtures().join("../../scripts/fetch-smollm2.sh");
    let out = Command::new(&script)
        .output()
        .expect("fetch-smollm2.sh runs");
    assert!(out.status.success(), "fetch-smollm2.sh: {}", text(&out));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The float32 tensors of a safetensors file: values and shape by name.
pub fn f32_tensors(file: &Path) -> HashMap<String, (Vec<f32>, Vec<usize>)> {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(name, v)| {
            let values = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, (values, v.shape().to_vec()))
        })
        .collect()
}

/// The `attention_mask` of `tests/fixtures/models/<name>/inputs.safetensors` (empty for an
/// image model's `pixel_values`).
pub fn fixture_mask(name: &str) -> Vec<i64> {
    let file = fixtures()
        .join("models")
        .join(name)
        .join("inputs.safetensors");
    let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // Image models have no mask: every output position counts.
    let Ok(mask) = st.tensor("attention_mask") else {
        return Vec::new();
    };
    mask.data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// A running `burn-peft serve` (its stderr read line by line); killed when dropped.
pub struct ServeProcess {
    pub child: Child,
    lines: Receiver<String>,
    /// The stderr lines read so far, for failure messages.
    pub seen: Vec<String>,
}

impl ServeProcess {
    /// Start `burn-peft serve` with `args` (`--port 0` and the model among them).
    pub fn spawn(args: &[&std::ffi::OsStr]) -> Self {
        let mut child = burn_peft()
            .arg("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next stderr line that contains `needle` (`None` after `timeout` without a line).
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        while let Ok(line) = self.lines.recv_timeout(timeout) {
            self.seen.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    }

    /// Wait for the banner (`... on http://ADDR`); the address it names.
    pub fn address(&mut self, timeout: Duration) -> Result<String, String> {
        let banner = self
            .wait_for("on http://", timeout)
            .ok_or("the server did not start")?;
        banner
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .map(str::to_string)
            .ok_or_else(|| "no address in the banner".to_string())
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
