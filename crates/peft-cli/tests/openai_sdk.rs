//! `burn-peft serve` driven by the official `openai` Python SDK (pinned in
//! `scripts/openai-venv.sh`, installed from PyPI into a cached venv): models, completions and
//! their stream, chat completions and their stream (the joined chunks equal the reply, which
//! equals transformers' greedy `generate(apply_chat_template(...))` on the real
//! SmolLM2-135M-Instruct, with the same `usage.prompt_tokens`), embeddings with the SDK's
//! defaults (base64) on all-MiniLM-L6-v2, `NotFoundError` for an unknown adapter and
//! `BadRequestError` for bad arguments (`tests/openai/check_sdk.py`).

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::*;

const MINILM: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// The venv's python, made by `scripts/openai-venv.sh` (PyPI on the first run only).
fn openai_python() -> String {
    let script = fixtures().join("../../scripts/openai-venv.sh");
    let out = Command::new(&script).output().expect("openai-venv.sh runs");
    assert!(out.status.success(), "openai-venv.sh: {}", text(&out));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn serve(args: &[&OsStr]) -> (ServeProcess, String) {
    let mut server = ServeProcess::spawn(args);
    let addr = server
        .address(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}: {}", server.seen.join("\n")));
    (server, addr)
}

/// Wait for `child` at most `limit` (then kill it and fail), so a hung client cannot hang CI.
fn bounded(mut child: Child, limit: Duration) -> Output {
    let start = std::time::Instant::now();
    while child.try_wait().expect("waits").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collects");
            panic!("check_sdk.py ran past {limit:?}:\n{}", text(&out));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().expect("collects")
}

#[test]
fn the_openai_sdk_talks_to_burn_peft_serve() {
    let python = openai_python();
    let model = smollm2();
    let adapter = format!("tuned={}", fixtures().join("gguf/smollm2_lora").display());
    let (_chat, chat_addr) = serve(&[
        OsStr::new("--port"),
        OsStr::new("0"),
        OsStr::new("--model"),
        model.as_os_str(),
        OsStr::new("--adapter"),
        OsStr::new(&adapter),
    ]);
    let (_embed, embed_addr) = serve(&["--port", "0", "--model", MINILM].map(OsStr::new));
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let child = Command::new(&python)
        .current_dir(&repo)
        .arg("tests/openai/check_sdk.py")
        .arg("--chat-url")
        .arg(format!("http://{chat_addr}/v1"))
        .arg("--embed-url")
        .arg(format!("http://{embed_addr}/v1"))
        .arg("--adapter")
        .arg("tuned")
        .arg("--reference")
        .arg("tests/fixtures/chat/smollm2_replies.json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    let out = bounded(child, Duration::from_secs(600));
    let printed = text(&out);
    assert!(out.status.success(), "check_sdk.py failed:\n{printed}");
    assert!(printed.contains("checks passed"), "{printed}");
}
