//! Shared helpers of the serving tests: fixtures, a server on a loopback port, and requests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::Device;
use peft_serve::client::{Client, Reply};
use peft_serve::{Metrics, ServeConfig, Server};
use serde_json::{Value, json};
use tokio::sync::oneshot;

// Linking the method crates registers LORA and PREFIX_TUNING with peft-core.
use peft_lora as _;
use peft_prefix as _;

/// The repository's test fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The tiny Llama (GQA; vocab 128, 64 positions, eos 2).
pub fn llama() -> PathBuf {
    fixtures().join("models/llama_gqa")
}

/// Four adapters of the tiny Llama: three LoRA and one prefix tuning (5 virtual tokens).
pub fn llama_adapters() -> Vec<(String, PathBuf)> {
    vec![
        ("sql".into(), fixtures().join("mixed/llama_gqa/sql")),
        ("chat".into(), fixtures().join("mixed/llama_gqa/chat")),
        ("lora".into(), fixtures().join("models/llama_gqa/lora")),
        ("table".into(), fixtures().join("prefix/llama_gqa_table")),
    ]
}

/// Copy a bundle's two files into `dest`.
pub fn copy_bundle(from: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(file), dest.join(file)).unwrap();
    }
}

/// A copy of the tiny Llama with a word-level `tokenizer.json` (`t0` … `t127`, split on
/// whitespace), so text prompts and stop strings can be tested.
pub fn llama_with_tokenizer(dir: &Path) -> PathBuf {
    let dest = dir.join("llama_tok");
    std::fs::create_dir_all(&dest).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(llama().join(file), dest.join(file)).unwrap();
    }
    let vocab: serde_json::Map<String, Value> =
        (0..128).map(|i| (format!("t{i}"), json!(i))).collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(dest.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    dest
}

/// A running server: its client, metrics and a way to stop it.
pub struct Running {
    /// Talks to it.
    pub client: Client,
    /// Its address.
    pub addr: SocketAddr,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Load `config` and serve it on a free loopback port.
pub async fn start(config: ServeConfig) -> Running {
    // The serving task runs detached; dropping `Running` asks it to stop.
    let Joinable {
        client,
        addr,
        metrics,
        stop,
        ..
    } = start_joinable(config).await;
    Running {
        client,
        addr,
        metrics,
        stop: Some(stop),
    }
}

/// A config of the tiny Llama with the four adapters.
pub fn llama_config() -> ServeConfig {
    ServeConfig {
        adapters: llama_adapters(),
        ..ServeConfig::new(llama().to_str().unwrap())
    }
}

/// A greedy completion request.
pub fn greedy(model: &str, prompt: &[i64], max_tokens: usize) -> Value {
    json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// The generated ids of a completion answer.
pub fn token_ids(reply: &Reply) -> Vec<i64> {
    let body = reply.json();
    body["choices"][0]["token_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no token_ids in {body}"))
        .iter()
        .map(|t| t.as_i64().unwrap())
        .collect()
}

/// Run `f` under a time limit, so a hang fails the test instead of blocking it.
pub async fn bounded<T>(seconds: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(seconds), f)
        .await
        .expect("the test ran past its time limit")
}

/// A server started by [`start_joinable`]: its client, metrics, the task serving it and the
/// trigger of its shutdown.
pub struct Joinable {
    /// Talks to it.
    pub client: Client,
    /// Its address.
    pub addr: SocketAddr,
    /// Its counters.
    pub metrics: Arc<Metrics>,
    /// Ends when `serve` returns.
    pub task: tokio::task::JoinHandle<Result<(), peft_serve::ServeError>>,
    /// Asks for shutdown.
    pub stop: oneshot::Sender<()>,
}

/// Load `config` and serve it on a free loopback port, keeping the serving task.
pub async fn start_joinable(config: ServeConfig) -> Joinable {
    let server = tokio::task::spawn_blocking(move || Server::load(&config, &Device::flex()))
        .await
        .unwrap()
        .unwrap();
    let metrics = server.metrics();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    Joinable {
        client: Client::new(addr),
        addr,
        metrics,
        task,
        stop,
    }
}

/// Read from `stream` until the peer closes it (or `limit` bytes came); what was read. An
/// error (a reset) ends the read like a close.
pub async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: usize) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < limit {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

/// Open a raw TCP connection to `addr` and send `bytes` (a request, possibly incomplete).
pub async fn raw_send(addr: SocketAddr, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// The value of a metric line `name value` (or `name{labels} value`) in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
