//! The scheduler thread: it owns the model, and between forward steps takes new requests,
//! loads and unloads adapters, and answers embeddings and classification requests. Every step
//! runs one forward over all running generations, whatever adapter each uses (continuous
//! batching over mixed-adapter batches, see [`crate::batch`]).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use peft_core::{PeftError, peft_type_of};
use peft_models::{Encoding, HfModel, ModelInputs};

use crate::api::unix_now;
use crate::batch::{DecodeBatch, Engine};
use crate::error::ApiError;
use crate::job::{Command, GenJob, OneShotJob, OneShotKind};
use crate::metrics::Metrics;
use crate::registry::{AdapterInfo, Registry};

/// How the HTTP side reaches the scheduler; admission to the bounded queue happens here.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
    max_queue: usize,
}

impl SchedulerHandle {
    /// Queue a request: 503 (with `Retry-After`) when `max_queue` requests already wait.
    pub fn submit(&self, command: Command) -> Result<(), ApiError> {
        let depth = &self.metrics.queue_depth;
        if depth.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            depth.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::queue_full(self.max_queue));
        }
        self.tx.send(command).map_err(|_| {
            depth.fetch_sub(1, Ordering::SeqCst);
            ApiError::unavailable()
        })
    }

    /// Send a control command (load, unload), which does not wait in the queue.
    pub fn control(&self, command: Command) -> Result<(), ApiError> {
        self.tx.send(command).map_err(|_| ApiError::unavailable())
    }
}

/// Settings of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sequences in one forward at most.
    pub max_batch: usize,
    /// Requests waiting at most.
    pub max_queue: usize,
}

/// Start the scheduler thread with `engine`; it runs until [`Command::Shutdown`] or until
/// every handle is dropped.
pub fn spawn(
    engine: Engine,
    registry: Arc<Registry>,
    limits: Limits,
) -> std::io::Result<(SchedulerHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let handle = SchedulerHandle {
        tx,
        metrics: engine.metrics.clone(),
        max_queue: limits.max_queue,
    };
    let thread = std::thread::Builder::new()
        .name("peft-serve-scheduler".into())
        .spawn(move || {
            Scheduler {
                engine,
                registry,
                limits,
                batch: DecodeBatch::default(),
                waiting: VecDeque::new(),
                oneshots: VecDeque::new(),
                unloads: Vec::new(),
            }
            .run(rx)
        })?;
    Ok((handle, thread))
}

struct Scheduler {
    engine: Engine,
    registry: Arc<Registry>,
    limits: Limits,
    batch: DecodeBatch,
    waiting: VecDeque<GenJob>,
    oneshots: VecDeque<OneShotJob>,
    unloads: Vec<(String, tokio::sync::oneshot::Sender<Result<(), ApiError>>)>,
}

impl Scheduler {
    fn idle(&self) -> bool {
        self.batch.is_empty()
            && self.waiting.is_empty()
            && self.oneshots.is_empty()
            && self.unloads.is_empty()
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            if self.idle() {
                match rx.recv() {
                    Ok(command) => {
                        if !self.handle(command) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            while let Ok(command) = rx.try_recv() {
                if !self.handle(command) {
                    return;
                }
            }
            self.drop_dead();
            self.finish_unloads();
            self.run_oneshots();
            self.admit();
            self.batch.step(&self.engine);
        }
    }

    /// Take one command; `false` to stop.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Generate(job) => self.waiting.push_back(job),
            Command::OneShot(job) => self.oneshots.push_back(job),
            Command::Load { name, dir, reply } => {
                let _ = reply.send(self.load(&name, &dir));
            }
            Command::Unload { name, reply } => {
                if !self.registry.contains(&name) {
                    let _ = reply.send(Err(ApiError::unknown_adapter(
                        &name,
                        &self.registry.serving_names(),
                    )));
                } else {
                    self.registry.set_draining(&name);
                    self.unloads.push((name, reply));
                }
            }
            Command::Shutdown => return false,
        }
        true
    }

    /// Load a bundle (between steps: the model is not in use).
    pub fn load(&mut self, name: &str, dir: &std::path::Path) -> Result<AdapterInfo, ApiError> {
        if self.registry.contains(name) {
            return Err(ApiError::conflict(format!(
                "an adapter named `{name}` is loaded already; unload it first or pick another name"
            )));
        }
        // The folder exists (checked by the registry): whatever fails in it, a missing or
        // unreadable file included, is the bundle's fault, not the server's.
        let info = load_adapter(&mut self.engine.model, name, dir).map_err(|e| match e {
            PeftError::AdapterExists(_) => ApiError::conflict(e.to_string()),
            other => ApiError::bad_field(
                "path",
                format!("the bundle `{}` cannot be loaded: {other}", dir.display()),
            ),
        })?;
        self.registry.insert(info.clone());
        self.engine
            .metrics
            .adapters_loaded
            .fetch_add(1, Ordering::Relaxed);
        Ok(info)
    }

    fn queued_leave(&self, n: usize) {
        self.engine
            .metrics
            .queue_depth
            .fetch_sub(n, Ordering::SeqCst);
    }

    fn drop_dead(&mut self) {
        let now = Instant::now();
        self.batch.drop_dead(now);
        let before = self.waiting.len() + self.oneshots.len();
        self.waiting
            .retain(|j| !j.events.is_closed() && now < j.deadline);
        self.oneshots
            .retain(|j| !j.reply.is_closed() && now < j.deadline);
        self.queued_leave(before - self.waiting.len() - self.oneshots.len());
    }

    /// Unload adapters that no running or waiting request uses any more.
    fn finish_unloads(&mut self) {
        let mut still = Vec::new();
        for (name, reply) in std::mem::take(&mut self.unloads) {
            let busy = self.batch.uses(&name)
                || self.waiting.iter().any(|j| j.adapter == name)
                || self.oneshots.iter().any(|j| j.adapter == name);
            if busy {
                // Even if the client gave up waiting, the unload goes on once they finish.
                still.push((name, reply));
                continue;
            }
            let result = self
                .engine
                .model
                .delete_adapter(&name)
                .map_err(|e| ApiError::internal(e.to_string()));
            self.registry.remove(&name);
            self.engine
                .metrics
                .adapters_loaded
                .fetch_sub(1, Ordering::Relaxed);
            let _ = reply.send(result);
        }
        self.unloads = still;
    }

    /// Move waiting generations into the batch while it has room.
    fn admit(&mut self) {
        let room = self.limits.max_batch.saturating_sub(self.batch.len());
        let take = room.min(self.waiting.len());
        if take == 0 {
            return;
        }
        let jobs: Vec<GenJob> = self.waiting.drain(..take).collect();
        self.queued_leave(jobs.len());
        let known = self.engine.model.adapter_names();
        let (jobs, gone): (Vec<GenJob>, Vec<GenJob>) = jobs
            .into_iter()
            .partition(|j| j.adapter == peft_core::nn::BASE_ROW || known.contains(&j.adapter));
        for job in gone {
            let error = ApiError::unknown_adapter(&job.adapter, &self.registry.serving_names());
            let _ = job.events.send(crate::job::GenEvent::Failed(error));
        }
        self.batch.admit(&self.engine, jobs);
        self.engine
            .metrics
            .running
            .store(self.batch.len(), Ordering::Relaxed);
    }

    /// Answer waiting embeddings / classification requests, up to `max_batch` inputs per
    /// forward, all adapters together.
    fn run_oneshots(&mut self) {
        while !self.oneshots.is_empty() {
            let mut jobs = Vec::new();
            let mut inputs = 0;
            while let Some(job) = self.oneshots.front() {
                if !jobs.is_empty() && inputs + job.inputs.len() > self.limits.max_batch {
                    break;
                }
                inputs += job.inputs.len();
                jobs.extend(self.oneshots.pop_front());
            }
            self.queued_leave(jobs.len());
            run_oneshot_group(&self.engine, jobs);
        }
    }
}

/// Load `dir` as adapter `name` and describe it.
pub fn load_adapter(
    model: &mut peft_core::PeftModel<HfModel>,
    name: &str,
    dir: &std::path::Path,
) -> Result<AdapterInfo, PeftError> {
    model.load_adapter(dir, name)?;
    let peft_type = model
        .adapter_config(name)
        .map_or("unknown", peft_type_of)
        .to_string();
    // The prefix length of this adapter alone: make it the active one for a moment (rows of
    // a mixed batch choose their adapter; the active set is not used while serving).
    let previous: Vec<String> = model.active_adapters().to_vec();
    model.set_adapter(name)?;
    let prefix_len = model.model().prefix_len();
    let previous: Vec<&str> = previous.iter().map(String::as_str).collect();
    if !previous.is_empty() {
        model.set_adapters(&previous)?;
    }
    Ok(AdapterInfo {
        name: name.to_string(),
        path: dir.to_path_buf(),
        peft_type,
        prefix_len,
        loaded_at: unix_now(),
        draining: false,
    })
}

/// One forward over the inputs of `jobs` (each row with its job's adapter). Encoders take a
/// right-padded batch with its mask; decoder classifiers pool the last token, so they batch
/// only inputs of one length.
fn run_oneshot_group(engine: &Engine, jobs: Vec<OneShotJob>) {
    let is_encoder = engine.model.model().arch().attends_bidirectionally();
    // Rows: (job, input) in order; grouped by length for decoders.
    let mut rows: Vec<(usize, usize)> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        rows.extend((0..job.inputs.len()).map(|i| (j, i)));
    }
    let mut groups: Vec<Vec<(usize, usize)>> = Vec::new();
    if is_encoder {
        groups.push(rows);
    } else {
        for row in rows {
            let len = jobs[row.0].inputs[row.1].ids.len();
            match groups
                .iter_mut()
                .find(|g| jobs[g[0].0].inputs[g[0].1].ids.len() == len)
            {
                Some(g) => g.push(row),
                None => groups.push(vec![row]),
            }
        }
    }
    let mut results: Vec<Vec<Option<Vec<f32>>>> =
        jobs.iter().map(|j| vec![None; j.inputs.len()]).collect();
    let mut failures: Vec<Option<ApiError>> = vec![None; jobs.len()];
    for group in groups {
        let encodings: Vec<&Encoding> = group.iter().map(|&(j, i)| &jobs[j].inputs[i]).collect();
        let adapters: Vec<&str> = group
            .iter()
            .map(|&(j, _)| jobs[j].adapter.as_str())
            .collect();
        engine.metrics.record_batch(group.len());
        match oneshot_forward(engine, jobs[group[0].0].kind, &encodings, &adapters) {
            Ok(out) => {
                for (&(j, i), v) in group.iter().zip(out) {
                    results[j][i] = Some(v);
                }
            }
            Err(e) => {
                for &(j, _) in &group {
                    failures[j] = Some(e.clone());
                }
            }
        }
    }
    for ((job, result), failure) in jobs.into_iter().zip(results).zip(failures) {
        let answer = match failure {
            Some(e) => Err(e),
            None => Ok(result.into_iter().map(Option::unwrap_or_default).collect()),
        };
        let _ = job.reply.send(answer);
    }
}

fn oneshot_forward(
    engine: &Engine,
    kind: OneShotKind,
    encodings: &[&Encoding],
    adapters: &[&str],
) -> Result<Vec<Vec<f32>>, ApiError> {
    let run = || -> Result<Vec<Vec<f32>>, ApiError> {
        let device = &engine.device;
        let b = encodings.len();
        let s = encodings.iter().map(|e| e.ids.len()).max().unwrap_or(1);
        let mut ids = vec![0i64; b * s];
        let mut mask = vec![0i64; b * s];
        let mut types = vec![0i64; b * s];
        for (r, e) in encodings.iter().enumerate() {
            for (j, (&id, &t)) in e.ids.iter().zip(&e.type_ids).enumerate() {
                ids[r * s + j] = id;
                mask[r * s + j] = 1;
                types[r * s + j] = t;
            }
        }
        let t = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [b, s]), device);
        let inputs = ModelInputs {
            input_ids: t(ids),
            attention_mask: Some(t(mask)),
            token_type_ids: Some(t(types)),
        };
        let ctx = engine
            .model
            .adapter_rows(adapters, device)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let out = engine.model.model().forward_with(&inputs, &ctx)?;
        let tensor = match kind {
            OneShotKind::Embed => out.sentence_embedding,
            OneShotKind::Classify => out.class_logits,
        }
        .ok_or_else(|| ApiError::internal("the model gave no output of this kind"))?;
        let [_, width] = tensor.dims();
        let values = tensor
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| ApiError::internal(format!("reading outputs: {e:?}")))?;
        Ok(values.chunks(width).map(<[f32]>::to_vec).collect())
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err(ApiError::internal("the forward failed (a panic)")))
}
