//! `burn-peft serve`: an HTTP/JSON server (OpenAI-compatible completions, embeddings,
//! classification) over one base model and many adapters, batched across adapters.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use peft_serve::ServeConfig;

use crate::adapters::AdapterArg;

/// Arguments of `burn-peft serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Base model: hub id or folder (causal LM, encoder or sequence classifier).
    #[arg(long)]
    model: String,
    /// Adapter to load at start, as `NAME=DIR` (or `DIR`, named `default`); repeatable.
    /// Requests choose one by its name in `model`.
    #[arg(long, value_parser = crate::adapters::parse_adapter)]
    adapter: Vec<AdapterArg>,
    /// The only folder `POST /v1/adapters` may load from (paths are relative to it); without
    /// it, adapters load only at start.
    #[arg(long)]
    adapters_dir: Option<PathBuf>,
    /// Address to bind; the default is loopback only.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to bind (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    #[command(flatten)]
    run_on: crate::device::RunOn,
    /// Sequences in one forward step at most (1: one request at a time).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    max_batch: u64,
    /// Requests waiting for a batch slot at most; beyond, 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Name of an environment variable holding the API key requests must send as
    /// `Authorization: Bearer KEY` (the key itself never goes on the command line).
    #[arg(long)]
    api_key_env: Option<String>,
    /// Seconds a request may take, waiting included; beyond, 408 and its slot is freed
    /// (values beyond ten years mean ten years).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout: u64,
    /// Largest request body in bytes; beyond, 413.
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Inputs one embeddings or classification request may hold; beyond, 400.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..))]
    max_inputs: u64,
    /// Adapters loaded at once (at start and at run time); beyond, 409.
    #[arg(long, default_value_t = 64)]
    max_adapters: usize,
    /// Seconds a client has to send a request's head; beyond, the connection is closed.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout: u64,
    /// Seconds a client has to send a request's body; beyond, 408.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    body_timeout: u64,
    /// Connections served at once; one more gets 503 and is closed.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
    /// Seconds the requests in flight get to finish after Ctrl-C (a second Ctrl-C stops at
    /// once).
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
}

/// `u64` from the command line as `usize`, saturating (on 32-bit targets).
fn size(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Run the subcommand.
pub fn run(args: ServeArgs) -> Result<()> {
    let device = crate::device::parse(&args.run_on.device)?;
    let api_key = match &args.api_key_env {
        Some(var) => {
            let key = std::env::var(var).map_err(|_| {
                crate::UsageError(format!(
                    "--api-key-env {var}: the environment variable `{var}` is not set"
                ))
            })?;
            if key.is_empty() {
                anyhow::bail!(crate::UsageError(format!(
                    "--api-key-env {var}: the environment variable `{var}` is empty"
                )));
            }
            Some(key)
        }
        None => None,
    };
    let config = ServeConfig {
        adapters: args
            .adapter
            .iter()
            .map(|a| (a.name.clone(), a.dir.clone()))
            .collect(),
        adapters_dir: args.adapters_dir,
        max_batch: size(args.max_batch),
        max_queue: args.max_queue,
        api_key,
        request_timeout: Duration::from_secs(args.request_timeout),
        max_body_bytes: args.max_body_bytes,
        max_inputs: size(args.max_inputs),
        max_adapters: args.max_adapters,
        header_timeout: Duration::from_secs(args.header_timeout),
        body_timeout: Duration::from_secs(args.body_timeout),
        max_connections: size(args.max_connections),
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        dtype: args.run_on.dtype,
        ..ServeConfig::new(&args.model)
    };
    let addr = SocketAddr::new(args.host, args.port);
    peft_serve::serve_blocking(&config, &device, addr)
        .with_context(|| format!("serving `{}` on {addr}", args.model))
}
