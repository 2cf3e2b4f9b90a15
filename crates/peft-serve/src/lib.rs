//! `burn-peft serve`: one base model, many PEFT adapters, each request choosing its own by the
//! OpenAI `model` field (`base` for none), as vLLM does.
//!
//! An HTTP/JSON server on axum + tokio. A scheduler thread owns the model and batches
//! continuously: every step runs one forward over every running generation whatever adapter
//! each uses (mixed-adapter batches), with a KV cache per sequence; new requests join between
//! steps; the queue is bounded (503 with `Retry-After` when full); requests time out; a client
//! that disconnects frees its slot. Adapters load and unload at run time, only from under
//! `--adapters-dir`; an unload waits for the requests that use the adapter.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use peft_serve::{ServeConfig, Server};
//!
//! # async fn run() -> Result<(), peft_serve::ServeError> {
//! let mut config = ServeConfig::new("path/to/llama");
//! config.adapters.push(("sql".into(), "adapters/sql".into()));
//! let server = Server::load(&config, &Device::flex())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//! server.serve(listener, std::future::pending()).await
//! # }
//! ```

#![warn(missing_docs)]

pub mod api;
mod batch;
pub mod client;
mod completions;
pub mod error;
mod inputs;
pub mod job;
pub mod metrics;
pub mod registry;
mod routes;
mod scheduler;
mod state;
mod text;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use burn::tensor::Device;
use peft_core::PeftModel;
use peft_models::{HfModel, Task, from_pretrained};

pub use error::{ApiError, ServeError};
pub use metrics::Metrics;
pub use routes::key_matches;
pub use state::{ModelInfo, ModelKind};

use crate::batch::Engine;
use crate::job::Command;
use crate::registry::Registry;
use crate::scheduler::{Limits, SchedulerHandle};
use crate::state::AppState;

/// The `model` of a request that runs the base model without adapter.
pub const BASE_MODEL: &str = "base";

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The base model: a hub id or folder.
    pub model: String,
    /// Its head (`Auto`: what config.json says).
    pub task: Task,
    /// Adapters to load at start, `(name, folder)`; any folder the operator names.
    pub adapters: Vec<(String, PathBuf)>,
    /// The only folder runtime loads (`POST /v1/adapters`) read from; `None` turns them off.
    pub adapters_dir: Option<PathBuf>,
    /// Sequences in one forward at most.
    pub max_batch: usize,
    /// Requests waiting for a slot at most; beyond, 503.
    pub max_queue: usize,
    /// The key requests must send as `Authorization: Bearer KEY`, if any.
    pub api_key: Option<String>,
    /// Time a request may take (queueing included); beyond, 408 and its slot is freed.
    pub request_timeout: Duration,
    /// Largest request body, in bytes; beyond, 413.
    pub max_body_bytes: usize,
}

impl ServeConfig {
    /// Defaults: batch 32, queue 256, 300 s per request, 1 MiB bodies, no key, no runtime
    /// loading.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            task: Task::Auto,
            adapters: Vec::new(),
            adapters_dir: None,
            max_batch: 32,
            max_queue: 256,
            api_key: None,
            request_timeout: Duration::from_secs(300),
            max_body_bytes: 1 << 20,
        }
    }
}

/// A loaded model with its scheduler running, ready to serve HTTP.
pub struct Server {
    state: Arc<AppState>,
    scheduler: SchedulerHandle,
}

fn model_kind(model: &HfModel) -> ModelKind {
    match model.task() {
        Task::CausalLm => ModelKind::CausalLm,
        Task::SequenceClassification { .. } => ModelKind::Classifier,
        // `task()` names the head a model carries, never `Auto`.
        Task::Encoder | Task::Auto => ModelKind::Encoder,
    }
}

/// `id2label` of config.json in id order.
fn labels(raw: &serde_json::Value) -> Vec<String> {
    let Some(map) = raw.get("id2label").and_then(|v| v.as_object()) else {
        return Vec::new();
    };
    let mut pairs: Vec<(usize, String)> = map
        .iter()
        .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_str()?.to_string())))
        .collect();
    pairs.sort();
    pairs.into_iter().map(|(_, l)| l).collect()
}

/// `eos_token_id` of config.json: a number or a list.
fn eos_ids(raw: &serde_json::Value) -> Vec<i64> {
    match raw.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_i64()).collect(),
        _ => Vec::new(),
    }
}

impl Server {
    /// Load the model and the start adapters on `device` and start the scheduler thread.
    pub fn load(config: &ServeConfig, device: &Device) -> Result<Self, ServeError> {
        if config.max_batch == 0 {
            return Err(ServeError::Config("--max-batch must be at least 1".into()));
        }
        let pretrained = from_pretrained(&config.model, config.task, device)?;
        let info = ModelInfo {
            source: config.model.clone(),
            kind: model_kind(&pretrained.model),
            context_limit: pretrained.model.position_limit().or_else(|| {
                pretrained
                    .config
                    .raw
                    .get("max_position_embeddings")
                    .and_then(|v| v.as_u64())
                    .map(|n| (n as usize, "max_position_embeddings"))
            }),
            vocab_size: pretrained.model.vocab_size(),
            labels: labels(&pretrained.config.raw),
            created: api::unix_now(),
        };
        let registry = Arc::new(Registry::new(config.adapters_dir.as_deref()).map_err(|e| {
            ServeError::Config(format!(
                "--adapters-dir {}: {e}",
                config
                    .adapters_dir
                    .as_deref()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default()
            ))
        })?);
        let metrics = Arc::new(Metrics::default());
        let mut model = PeftModel::new(pretrained.model);
        for (name, dir) in &config.adapters {
            Registry::check_name(name).map_err(|e| ServeError::Config(e.message))?;
            if registry.contains(name) {
                return Err(ServeError::Config(format!(
                    "--adapter: the name `{name}` is used twice"
                )));
            }
            let info = scheduler::load_adapter(&mut model, name, dir).map_err(|source| {
                ServeError::Adapter {
                    name: name.clone(),
                    dir: dir.clone(),
                    source: Box::new(source),
                }
            })?;
            registry.insert(info);
            metrics.adapters_loaded.fetch_add(1, Ordering::Relaxed);
        }
        let engine = Engine {
            model,
            device: device.clone(),
            eos: eos_ids(&pretrained.config.raw),
            metrics: metrics.clone(),
        };
        let limits = Limits {
            max_batch: config.max_batch,
            max_queue: config.max_queue,
        };
        let (scheduler, _thread) = scheduler::spawn(engine, registry.clone(), limits)?;
        let state = Arc::new(AppState::new(
            scheduler.clone(),
            registry,
            metrics,
            pretrained.tokenizer.map(Arc::new),
            info,
            config.api_key.clone().map(String::into_bytes),
            config.request_timeout,
            config.max_body_bytes,
        ));
        Ok(Self { state, scheduler })
    }

    /// The HTTP routes (for embedding the server in another axum app).
    pub fn router(&self) -> axum::Router {
        routes::router(self.state.clone())
    }

    /// The server's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    /// What the model is and allows.
    pub fn info(&self) -> &ModelInfo {
        &self.state.info
    }

    /// Serve on `listener` until `shutdown` completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The scheduler thread ends; requests still waiting get 503.
        let _ = self.scheduler.control(Command::Shutdown);
    }
}

/// Load, bind `addr` and serve until Ctrl-C, on a runtime of its own (the CLI's entry point).
pub fn serve_blocking(
    config: &ServeConfig,
    device: &Device,
    addr: SocketAddr,
) -> Result<(), ServeError> {
    let server = Server::load(config, device)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        eprintln!(
            "burn-peft serve: {} ({:?}) on http://{local} with {} adapter(s)",
            server.info().source,
            server.info().kind,
            server.state.registry.serving_names().len()
        );
        server
            .serve(listener, async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    })
}
