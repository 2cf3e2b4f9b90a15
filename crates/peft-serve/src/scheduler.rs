//! The scheduler thread: it owns the model, and between forward steps takes new requests,
//! loads and unloads adapters, and answers embeddings and classification requests in chunks.
//! Every step runs one forward over all running generations, whatever adapter each uses
//! (continuous batching over mixed-adapter batches, see [`crate::batch`]).
//!
//! Nothing the scheduler runs may end the thread: forwards, loads (a method plugin's code) and
//! the cache bookkeeping catch panics and fail only the requests concerned, and each round of
//! the loop is guarded once more. If the thread ends anyway (shutdown, or a bug), it says so
//! through [`SchedulerHandle::is_alive`], which `/health` reports.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use peft_core::PeftError;

use crate::adapters::{LoadFailure, panic_message};
use crate::batch::{DecodeBatch, Engine};
use crate::error::ApiError;
use crate::job::{Command, GenJob};
use crate::metrics::Metrics;
use crate::oneshot::OneShots;
use crate::registry::{AdapterInfo, Registry};

/// How the HTTP side reaches the scheduler; admission to the bounded queue happens here.
#[derive(Clone)]
pub struct SchedulerHandle {
    tx: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
    max_queue: usize,
    alive: Arc<AtomicBool>,
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

    /// Whether the scheduler thread is still running.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

/// Settings of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sequences (or embedding inputs) in one forward at most.
    pub max_batch: usize,
    /// Requests waiting at most.
    pub max_queue: usize,
    /// Adapters loaded at most.
    pub max_adapters: usize,
}

/// Clears the liveness flag when the thread ends, however it ends (a panic unwinds through
/// this too).
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Start the scheduler thread with `engine`; it runs until [`Command::Shutdown`] or until
/// every handle is dropped.
pub fn spawn(
    engine: Engine,
    registry: Arc<Registry>,
    limits: Limits,
) -> std::io::Result<(SchedulerHandle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let alive = Arc::new(AtomicBool::new(true));
    let handle = SchedulerHandle {
        tx,
        metrics: engine.metrics.clone(),
        max_queue: limits.max_queue,
        alive: alive.clone(),
    };
    let thread = std::thread::Builder::new()
        .name("peft-serve-scheduler".into())
        .spawn(move || {
            let _alive = AliveGuard(alive);
            Scheduler {
                engine,
                registry,
                limits,
                batch: DecodeBatch::default(),
                waiting: VecDeque::new(),
                oneshots: OneShots::default(),
                unloads: Vec::new(),
            }
            .run(rx)
        });
    match thread {
        Ok(thread) => Ok((handle, thread)),
        Err(e) => {
            handle.alive.store(false, Ordering::SeqCst);
            Err(e)
        }
    }
}

/// An unload waiting for the requests on its adapter; every `DELETE` of it gets the answer.
struct Unload {
    name: String,
    replies: Vec<tokio::sync::oneshot::Sender<Result<(), ApiError>>>,
}

struct Scheduler {
    engine: Engine,
    registry: Arc<Registry>,
    limits: Limits,
    batch: DecodeBatch,
    waiting: VecDeque<GenJob>,
    oneshots: OneShots,
    unloads: Vec<Unload>,
}

impl Scheduler {
    fn idle(&self) -> bool {
        self.batch.is_empty()
            && self.waiting.is_empty()
            && self.oneshots.is_empty()
            && self.unloads.is_empty()
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
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
            // A busy spell runs on a worker of rayon's pool: a round is many small parallel
            // ops, and from a worker they cost no wake-ups (`peft_ops::on_pool`). Entered once
            // per spell, not per round: a tiny model's round is shorter than the trip into the
            // pool (one request at a time on the tiny Llama of `benches/serve.rs` went from
            // 13,494 to 7,583 tokens/s with a trip per round). Idle, the thread leaves the pool
            // to wait for commands, so it never holds a worker while it blocks.
            let this = &mut self;
            let (back, go_on) = peft_ops::on_pool(move || {
                let go_on = this.busy(&rx);
                (rx, go_on)
            });
            rx = back;
            if !go_on {
                return;
            }
        }
    }

    /// Rounds until there is nothing left to do, taking the commands that came in before each;
    /// `false` to stop.
    fn busy(&mut self, rx: &mpsc::Receiver<Command>) -> bool {
        loop {
            while let Ok(command) = rx.try_recv() {
                if !self.handle(command) {
                    return false;
                }
            }
            // The last guard: whatever panics in a round fails the requests in flight, and the
            // scheduler goes on with the next round.
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.round())) {
                let error = ApiError::internal(format!(
                    "the scheduler failed while running this request: {}",
                    panic_message(panic.as_ref())
                ));
                self.batch.fail_all(error.clone());
                self.oneshots.fail_started(&error);
                self.engine.metrics.running.store(0, Ordering::Relaxed);
            }
            if self.idle() {
                return true;
            }
        }
    }

    /// One round: drop what nobody waits for, finish unloads, one chunk of embedding or
    /// classification inputs, new generations, one decode step.
    fn round(&mut self) {
        self.drop_dead();
        self.finish_unloads();
        let started = self.oneshots.run_chunk(&self.engine, self.limits.max_batch);
        self.queued_leave(started);
        self.admit();
        self.batch.step(&self.engine);
        // Stored here, after every round, rather than in the step: a round whose only
        // sequences were dropped (their clients left) runs no step, and the gauge would keep
        // the old count while the scheduler sleeps.
        self.engine
            .metrics
            .running
            .store(self.batch.len(), Ordering::Relaxed);
    }

    /// Take one command; `false` to stop.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Generate(job) => self.waiting.push_back(job),
            Command::OneShot(job) => self.oneshots.push(job),
            Command::Load { name, dir, reply } => {
                let _ = reply.send(self.load(&name, &dir));
            }
            Command::Unload { name, reply } => {
                if let Some(pending) = self.unloads.iter_mut().find(|u| u.name == name) {
                    // Unloading is idempotent: a second DELETE waits for the same unload.
                    pending.replies.push(reply);
                } else if !self.registry.contains(&name) {
                    let _ = reply.send(Err(ApiError::unknown_adapter(
                        &name,
                        &self.registry.serving_names(),
                    )));
                } else {
                    self.registry.set_draining(&name, true);
                    self.unloads.push(Unload {
                        name,
                        replies: vec![reply],
                    });
                }
            }
            Command::Shutdown => return false,
        }
        true
    }

    /// The gauge of loaded adapters, from the registry (a count, so it cannot wrap).
    fn count_adapters(&self) {
        self.engine
            .metrics
            .adapters_loaded
            .store(self.registry.len(), Ordering::Relaxed);
    }

    /// Load a bundle (between steps: the model is not in use).
    pub fn load(&mut self, name: &str, dir: &std::path::Path) -> Result<AdapterInfo, ApiError> {
        if self.registry.contains(name) {
            return Err(ApiError::conflict(format!(
                "an adapter named `{name}` is loaded already; unload it first or pick another name"
            )));
        }
        check_room(&self.registry, self.limits.max_adapters)?;
        let shown = self.registry.shown_path(dir);
        // The folder exists (checked by the registry): whatever fails in it, a missing or
        // unreadable file included, is the bundle's fault, not the server's.
        let info = crate::adapters::load(&mut self.engine.model, name, dir, shown.clone())
            .map_err(|failure| match failure {
                LoadFailure::Bundle(e @ PeftError::AdapterExists(_)) => {
                    ApiError::conflict(e.to_string())
                }
                LoadFailure::Bundle(other) => ApiError::bad_field(
                    "path",
                    self.registry
                        .scrub(&format!("the bundle `{shown}` cannot be loaded: {other}")),
                ),
                LoadFailure::Panic(why) => ApiError::internal(self.registry.scrub(&format!(
                    "loading `{shown}` failed: its method's code panicked ({why}); the server \
                     goes on without it"
                ))),
            })?;
        self.registry.insert(info.clone());
        self.count_adapters();
        Ok(info)
    }

    fn queued_leave(&self, n: usize) {
        if n > 0 {
            self.engine
                .metrics
                .queue_depth
                .fetch_sub(n, Ordering::SeqCst);
        }
    }

    fn drop_dead(&mut self) {
        let now = Instant::now();
        self.batch.drop_dead(now);
        let before = self.waiting.len();
        self.waiting
            .retain(|j| !j.events.is_closed() && now < j.deadline);
        let queued = before - self.waiting.len() + self.oneshots.drop_dead(now);
        self.queued_leave(queued);
    }

    /// Unload adapters that no running or waiting request uses any more.
    fn finish_unloads(&mut self) {
        let mut still = Vec::new();
        for unload in std::mem::take(&mut self.unloads) {
            let name = &unload.name;
            let busy = self.batch.uses(name)
                || self.waiting.iter().any(|j| &j.adapter == name)
                || self.oneshots.uses(name);
            if busy {
                // Even if the client gave up waiting, the unload goes on once they finish.
                still.push(unload);
                continue;
            }
            let model = &mut self.engine.model;
            let result = match catch_unwind(AssertUnwindSafe(|| model.delete_adapter(name))) {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(ApiError::internal(e.to_string())),
                Err(panic) => Err(ApiError::internal(format!(
                    "unloading `{name}` failed: {}",
                    panic_message(panic.as_ref())
                ))),
            };
            if result.is_ok() || self.engine.model.adapter_config(name).is_none() {
                self.registry.remove(name);
            } else {
                // Still in the model: it serves again rather than being lost half-way.
                self.registry.set_draining(name, false);
            }
            self.count_adapters();
            for reply in unload.replies {
                let _ = reply.send(result.clone());
            }
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
    }
}

/// 409 when `registry` already holds `max` adapters (`--max-adapters`).
pub(crate) fn check_room(registry: &Registry, max: usize) -> Result<(), ApiError> {
    if registry.len() >= max {
        return Err(ApiError::conflict(format!(
            "the server holds {max} adapters, its limit (--max-adapters): unload one first \
             (DELETE /v1/adapters/NAME)"
        )));
    }
    Ok(())
}
