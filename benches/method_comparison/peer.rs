//! The PyTorch + Hugging Face PEFT peer (`benches/peer/peft_cpu.py`), run per row.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::rows::{Method, ModelKind, Row};
use crate::{LLAMA_DIR, MINILM, Settings, repo_root};

pub(crate) struct PeerSetup {
    pub(crate) python: String,
    pub(crate) python_prefix: String,
    pub(crate) script: PathBuf,
}

pub(crate) fn peer_setup() -> Option<PeerSetup> {
    if std::env::var("BENCH_NO_PEER").is_ok_and(|v| v != "0") {
        return None;
    }
    let script = repo_root().join("benches/peer/peft_cpu.py");
    if !script.is_file() {
        return None;
    }
    let python = std::env::var("PEFT_PEER_PYTHON").unwrap_or_else(|_| "python3".into());
    let python_prefix = std::env::var("PEFT_PEER_PYTHON_PREFIX").unwrap_or_else(|_| {
        if Path::new("/tmp/venv457/bin/python").exists() {
            "/tmp/venv457/bin/python".into()
        } else {
            python.clone()
        }
    });
    Some(PeerSetup {
        python,
        python_prefix,
        script,
    })
}

pub(crate) fn run_peer(
    peer: &PeerSetup,
    row: Row,
    num_labels: usize,
    s: &Settings,
) -> Result<Value, String> {
    let method = row.peer_method().ok_or("no peer row")?;
    let (model, task) = match row.model {
        ModelKind::MiniLm => (MINILM.to_string(), "classification"),
        ModelKind::Llama => (
            repo_root().join(LLAMA_DIR).display().to_string(),
            "causal-lm",
        ),
    };
    // transformers 5's BERT ignores past_key_values: prefix tuning on BERT needs the 4.x venv.
    let python = if row.model == ModelKind::MiniLm && row.method == Method::Prefix {
        &peer.python_prefix
    } else {
        &peer.python
    };
    let iters = s.peer_iters.to_string();
    let labels = num_labels.max(2).to_string();
    let mut cmd = Command::new(python);
    cmd.arg(&peer.script)
        .args([
            "steps", "--model", &model, "--task", task, "--method", method,
        ])
        .args(["--num-labels", &labels, "--batch", "16", "--seq", "64"])
        .args(["--threads", "2", "--iters", &iters, "--json", "-"])
        .current_dir(repo_root())
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{python} peft_cpu.py exited with {}", out.status));
    }
    let mut v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("peer output is not JSON: {e}"))?;
    if let Some(m) = v.as_object_mut() {
        m.insert("python".into(), json!(python));
    }
    Ok(v)
}
