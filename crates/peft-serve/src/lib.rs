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

mod adapters;
pub mod api;
mod batch;
mod chat;
pub mod client;
mod completions;
pub mod error;
mod http;
mod inputs;
pub mod job;
pub mod metrics;
mod oneshot;
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
use peft_core::precision::BaseDType;
use peft_models::{Task, from_pretrained};

pub use error::{ApiError, ServeError};
pub use metrics::Metrics;
pub use routes::key_matches;
pub use state::{ModelInfo, RequestLimits};

use crate::batch::Engine;
use crate::http::ConnectionLimits;
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
    /// Inputs one embeddings or classification request may hold; beyond, 400.
    pub max_inputs: usize,
    /// Adapters loaded at once (start and run time together); beyond, 409.
    pub max_adapters: usize,
    /// Time a client has to send the head of a request; beyond, the connection is closed.
    pub header_timeout: Duration,
    /// Time a client has to send the body of a request; beyond, 408.
    pub body_timeout: Duration,
    /// Connections open at once; beyond, a new connection gets 503 and is closed.
    pub max_connections: usize,
    /// After shutdown is asked for, time the requests in flight get to finish; then every
    /// connection is closed.
    pub shutdown_grace: Duration,
    /// Precision of the frozen base (`f16`, `bf16`; `nf4`, `q8` quantized), applied after the
    /// start adapters load, as `burn-peft train` / `generate` apply it; adapters stay f32.
    pub dtype: BaseDType,
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
            max_inputs: 2048,
            max_adapters: 64,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(30),
            dtype: BaseDType::F32,
        }
    }
}

/// A loaded model with its scheduler running, ready to serve HTTP.
pub struct Server {
    state: Arc<AppState>,
    scheduler: SchedulerHandle,
    connections: ConnectionLimits,
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

impl Server {
    /// Load the model and the start adapters on `device` and start the scheduler thread.
    pub fn load(config: &ServeConfig, device: &Device) -> Result<Self, ServeError> {
        if config.max_batch == 0 {
            return Err(ServeError::Config("--max-batch must be at least 1".into()));
        }
        if config.adapters.len() > config.max_adapters {
            return Err(ServeError::Config(format!(
                "{} adapters given with --adapter, but --max-adapters is {}: raise the limit \
                 or load fewer",
                config.adapters.len(),
                config.max_adapters
            )));
        }
        let pretrained = from_pretrained(&config.model, config.task, device)?;
        // A template that does not compile leaves the server up for everything but chat,
        // which then says why.
        let chat = match pretrained.chat() {
            Ok(Some(template)) => Ok(Arc::new(template)),
            Ok(None) => Err(format!(
                "the model `{}` has no chat template (no chat_template.jinja, no chat_template \
                 in tokenizer_config.json or the GGUF metadata): use /v1/completions",
                state::shown_model_name(&config.model)
            )),
            Err(e) => {
                log::warn!("chat is off: {e}");
                Err(format!("chat is off: {e}"))
            }
        };
        let special_tokens = pretrained.special_tokens.clone();
        let info = ModelInfo {
            source: config.model.clone(),
            name: state::shown_model_name(&config.model),
            task: pretrained.model.task(),
            context_limit: peft_models::generate_limits::context_limit(
                &pretrained.model,
                &pretrained.config.raw,
            ),
            vocab_size: pretrained.model.vocab_size(),
            eos_token_ids: peft_models::generate::eos_token_ids(&pretrained.config.raw),
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
            Registry::check_name(name)
                .map_err(|e| ServeError::Config(format!("--adapter {name}: {}", e.message)))?;
            if registry.contains(name) {
                return Err(ServeError::Config(format!(
                    "--adapter: the name `{name}` is used twice"
                )));
            }
            adapters::check_shared_base(dir).map_err(|why| {
                ServeError::Config(format!("--adapter {name}={}: {why}", dir.display()))
            })?;
            let shown = registry.shown_path(dir);
            let info = adapters::load(&mut model, name, dir, shown).map_err(|failure| {
                let source = match failure {
                    adapters::LoadFailure::Bundle(e) => e,
                    adapters::LoadFailure::Panic(why) => peft_core::PeftError::InvalidState(
                        format!("the method's code panicked while loading: {why}"),
                    ),
                };
                ServeError::Adapter {
                    name: name.clone(),
                    dir: dir.clone(),
                    source: Box::new(source),
                }
            })?;
            registry.insert(info);
        }
        if config.dtype != BaseDType::F32 {
            let report =
                peft_models::base_dtype::apply_base_dtype(&mut model, config.dtype, device)
                    .map_err(|e| ServeError::Config(format!("--dtype {}: {e}", config.dtype)))?;
            eprintln!("{report}");
        }
        metrics
            .adapters_loaded
            .store(registry.len(), Ordering::Relaxed);
        let engine = Engine {
            model,
            device: device.clone(),
            eos: peft_models::generate::eos_token_ids(&pretrained.config.raw),
            metrics: metrics.clone(),
        };
        let limits = Limits {
            max_batch: config.max_batch,
            max_queue: config.max_queue,
            max_adapters: config.max_adapters,
        };
        let (scheduler, _thread) = scheduler::spawn(engine, registry.clone(), limits)?;
        let state = Arc::new(
            AppState::new(
                scheduler.clone(),
                registry,
                metrics,
                pretrained.tokenizer.map(Arc::new),
                info,
                config.api_key.clone().map(String::into_bytes),
                RequestLimits {
                    timeout: config.request_timeout,
                    body_limit: config.max_body_bytes,
                    body_timeout: config.body_timeout,
                    max_inputs: config.max_inputs,
                    max_adapters: config.max_adapters,
                },
            )
            .with_chat(chat, special_tokens),
        );
        let connections = ConnectionLimits {
            header_timeout: config.header_timeout.min(state::MAX_TIMEOUT),
            max_connections: config.max_connections,
            shutdown_grace: config.shutdown_grace.min(state::MAX_TIMEOUT),
        };
        Ok(Self {
            state,
            scheduler,
            connections,
        })
    }

    /// The HTTP routes (for embedding the server in another axum app, which then owns the
    /// connection limits).
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

    /// Whether the scheduler thread runs (`/health` answers 503 once it does not).
    pub fn scheduler_alive(&self) -> bool {
        self.scheduler.is_alive()
    }

    /// Serve on `listener` until `shutdown` completes; then the requests in flight get
    /// `shutdown_grace` before every connection is closed.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        self.serve_until(listener, shutdown, std::future::pending())
            .await
    }

    /// [`serve`](Self::serve), and once shutting down, stop waiting for the requests in
    /// flight as soon as `force` completes (a second Ctrl-C).
    pub async fn serve_until(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
        force: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        http::serve(self.router(), listener, self.connections, shutdown, force).await?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The scheduler thread ends; requests still waiting get 503.
        let _ = self.scheduler.control(Command::Shutdown);
    }
}

/// Count interrupts (Ctrl-C, and SIGTERM on Unix) into `tx`. The handlers are installed
/// before this returns, so a signal that comes once the server is announced is never the
/// default action (killing the process without a shutdown).
fn count_interrupts(tx: tokio::sync::watch::Sender<u32>) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(()) = interrupt.recv() => {}
                    Some(()) = terminate.recv() => {}
                    else => break,
                }
                tx.send_modify(|n| *n += 1);
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            tx.send_modify(|n| *n += 1);
        }
    });
    Ok(())
}

/// Load, bind `addr` and serve until Ctrl-C, on a runtime of its own (the CLI's entry point).
/// The first Ctrl-C (or SIGTERM) stops accepting and gives the requests in flight
/// `shutdown_grace`; a second one closes everything at once.
pub fn serve_blocking(
    config: &ServeConfig,
    device: &Device,
    addr: SocketAddr,
) -> Result<(), ServeError> {
    let server = Server::load(config, device)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let grace = config.shutdown_grace;
    runtime.block_on(async move {
        let (tx, interrupts) = tokio::sync::watch::channel(0u32);
        count_interrupts(tx)?;
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        eprintln!(
            "burn-peft serve: {} ({}) on http://{local} with {} adapter(s)",
            server.info().source,
            server.info().task,
            server.state.registry.serving_names().len()
        );
        let mut first = interrupts.clone();
        let shutdown = async move {
            if first.wait_for(|n| *n >= 1).await.is_err() {
                // No signal can come any more: serve on.
                std::future::pending::<()>().await;
            }
            eprintln!(
                "burn-peft serve: shutting down; requests in flight get up to {:.0} s \
                 (--shutdown-grace); Ctrl-C again to stop now",
                grace.as_secs_f64()
            );
        };
        let mut second = interrupts;
        let force = async move {
            if second.wait_for(|n| *n >= 2).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        server.serve_until(listener, shutdown, force).await
    })
}
