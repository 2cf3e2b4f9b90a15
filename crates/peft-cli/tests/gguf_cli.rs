//! A GGUF file wherever the CLI takes a model: the real SmolLM2-135M-Instruct Q4_1 file
//! (`scripts/fetch-smollm2.sh`) answers a chat-templated question through `generate`, trains a
//! LoRA adapter from a run config whose `name_or_path` is the file (relative to the config),
//! evaluates it, and serves it over HTTP. Full fine-tuning of the quantized base is refused.

mod common;

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{ServeProcess, bad_input, burn_peft, smollm2, text};

/// The chat template of the file's metadata, applied by transformers to one user turn
/// (`tests/fixtures/gguf/smollm2_reference.json`).
const FRANCE: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n\
<|im_start|>assistant\n";

#[test]
fn generate_answers_from_the_gguf_file() {
    let model = smollm2();
    let out = burn_peft()
        .args(["generate", "--max-new-tokens", "10", "--model"])
        .arg(&model)
        .args(["--prompt", FRANCE])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains("Paris"), "SmolLM2 answered {answer:?}");
}

/// A run folder: the GGUF file linked beside a run config that names it relatively.
fn run_folder(dir: &Path, method: &str) -> PathBuf {
    std::os::unix::fs::symlink(smollm2(), dir.join("smollm2.gguf")).unwrap();
    let lines: Vec<String> = (0..8)
        .map(|i| {
            format!(
                "{{\"text\": \"Question {i}: what is {i} plus {i}? Answer: {}.\"}}",
                2 * i
            )
        })
        .collect();
    std::fs::write(dir.join("train.jsonl"), lines.join("\n")).unwrap();
    let config = dir.join("run.yaml");
    std::fs::write(
        &config,
        format!(
            "model:\n  name_or_path: smollm2.gguf\n  task: causal-lm\n{method}\
             data:\n  train: train.jsonl\n  max_length: 24\n\
             train:\n  epochs: 1\n  max_steps: 2\n  batch_size: 4\n  learning_rate: 1.0e-3\n  \
             progress: false\noutput: out\n"
        ),
    )
    .unwrap();
    config
}

#[cfg(unix)]
#[test]
fn full_fine_tuning_of_a_gguf_base_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = run_folder(dir.path(), "method: full\n");
    let out = burn_peft().arg("train").arg(&config).output().unwrap();
    bad_input(&out, &["GGUF", "full"]);
    assert!(!dir.path().join("out").exists(), "nothing is written");
}

#[cfg(unix)]
#[test]
fn train_eval_and_serve_a_lora_on_the_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = run_folder(
        dir.path(),
        "method:\n  peft_type: LORA\n  r: 4\n  lora_alpha: 8\n  target_modules: [q_proj, v_proj]\n",
    );
    let out = burn_peft().arg("train").arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let adapter = dir.path().join("out/adapter");
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["r"], 4);
    assert!(adapter.join("adapter_model.safetensors").is_file());

    let model = dir.path().join("smollm2.gguf");
    let out = burn_peft()
        .args([
            "eval",
            "--task",
            "causal-lm",
            "--max-length",
            "24",
            "--model",
        ])
        .arg(&model)
        .arg("--adapter")
        .arg(&adapter)
        .arg("--data")
        .arg(dir.path().join("train.jsonl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(printed.contains("loss"), "eval printed {printed}");

    let reply = serve_one_completion(&model, &adapter);
    let body: serde_json::Value =
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("not JSON ({e}): {reply}"));
    let answer = body["choices"][0]["text"].as_str().unwrap_or_default();
    assert_eq!(body["model"], "tuned", "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 6, "{body}");
    assert!(!answer.is_empty(), "{body}");
}

/// `burn-peft serve --model FILE.gguf --adapter tuned=DIR`, one `/v1/completions` request for
/// six tokens with the adapter; the response body.
fn serve_one_completion(model: &Path, adapter: &Path) -> String {
    let adapter = format!("tuned={}", adapter.display());
    let args = ["--port", "0", "--model"].map(OsStr::new);
    let mut args = args.to_vec();
    args.extend([
        model.as_os_str(),
        OsStr::new("--adapter"),
        OsStr::new(&adapter),
    ]);
    let mut server = ServeProcess::spawn(&args);
    let outcome = (|| -> Result<String, String> {
        let addr = server.address(Duration::from_secs(120))?;
        let body = serde_json::json!({"model": "tuned", "prompt": FRANCE, "max_tokens": 6,
                                      "temperature": 0, "stop": []})
        .to_string();
        let completion = request(&addr, "POST /v1/completions", &body)?;
        // Clients see the file's name, never the server's path to it.
        let models = request(&addr, "GET /v1/models", "")?;
        if !models.contains("\"smollm2.gguf\"") || models.contains(&*model.to_string_lossy()) {
            return Err(format!("/v1/models shows {models}"));
        }
        Ok(completion)
    })();
    outcome.unwrap_or_else(|why| panic!("{why}; server stderr:\n{}", server.seen.join("\n")))
}

/// One HTTP/1.1 request (`"POST /path"`) with a JSON body; the body of a 200 response.
fn request(addr: &str, line: &str, body: &str) -> Result<String, String> {
    let mut stream = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "{line} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{line}: {head}\n{body}"));
    }
    Ok(body.to_string())
}
