//! The running batch of the scheduler: every sequence being generated, whatever its adapter,
//! with its own KV cache; one decode step runs one forward over all of them (a mixed-adapter
//! batch, [`PeftModel::adapter_rows`]).
//!
//! The cache is kept as one batch while membership holds still; sequences that finish are cut
//! out with [`KvCache::select_rows`]; when new ones join, the batch is split into one cache per
//! sequence ([`KvCache::split_rows`]) and stacked again with theirs ([`KvCache::stack`]), each
//! row left-padded and shifted so it continues at its own position, exactly as it would alone.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use burn::tensor::Device;
use peft_core::PeftModel;
use peft_models::generate::{host_ids, int_rows};
use peft_models::{GenerationConfig, HfModel, KvCache, ModelError};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::error::ApiError;
use crate::job::{FinishReason, GenEvent, GenJob};
use crate::metrics::Metrics;

/// One sequence being generated.
#[derive(Debug)]
pub struct Sequence {
    job: GenJob,
    config: GenerationConfig,
    rng: StdRng,
    generated: usize,
    last: i64,
}

impl Sequence {
    fn new(job: GenJob, eos: &[i64]) -> Self {
        let s = &job.sampling;
        let config = GenerationConfig {
            max_new_tokens: s.max_tokens,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
            eos_token_ids: eos.iter().chain(&s.stop_token_ids).copied().collect(),
            ..Default::default()
        };
        Self {
            rng: StdRng::seed_from_u64(s.seed),
            config,
            generated: 0,
            last: 0,
            job,
        }
    }

    /// The adapter it runs.
    pub fn adapter(&self) -> &str {
        &self.job.adapter
    }

    /// Whether its client still listens and its time is not up.
    pub fn alive(&self, now: Instant) -> bool {
        !self.job.events.is_closed() && now < self.job.deadline
    }

    /// Pick the next token from this row's logits and send it; whether the sequence goes on.
    fn advance(&mut self, logits: &[f32]) -> bool {
        let token = peft_models::generate::pick(logits, &self.config, &mut self.rng);
        self.generated += 1;
        self.last = token;
        if self.job.events.send(GenEvent::Token(token)).is_err() {
            return false;
        }
        let finish = if self.config.eos_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if self.generated >= self.config.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        match finish {
            Some(reason) => {
                let _ = self.job.events.send(GenEvent::Finished(reason));
                false
            }
            None => true,
        }
    }

    fn fail(&self, error: ApiError) {
        let _ = self.job.events.send(GenEvent::Failed(error));
    }
}

/// Everything one forward needs besides the inputs.
pub struct Engine {
    /// The base model with every adapter loaded (none active: rows choose).
    pub model: PeftModel<HfModel>,
    /// Where it runs.
    pub device: Device,
    /// End-of-sequence ids of config.json.
    pub eos: Vec<i64>,
    /// Shared counters.
    pub metrics: Arc<Metrics>,
}

impl Engine {
    /// A forward of `ids` (`[rows, seq]`) with `mask` and `cache`, row `i` with adapter
    /// `adapters[i]`; the logits of each row's last position. A panic inside is an error, so a
    /// bad request cannot take the scheduler down.
    fn last_logits(
        &self,
        ids: &[Vec<i64>],
        mask: &[Vec<i64>],
        cache: &mut KvCache,
        adapters: &[&str],
    ) -> Result<Vec<Vec<f32>>, ApiError> {
        let run = || -> Result<Vec<Vec<f32>>, ApiError> {
            let ctx = self
                .model
                .adapter_rows(adapters, &self.device)
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let (ids, ctx) = host_ids(ids, &ctx, &self.device);
            let logits = self.model.model().forward_lm_last_with(
                ids,
                Some(int_rows(mask, &self.device)),
                Some(cache),
                &ctx,
            )?;
            let v = logits.dims()[2];
            let values = logits
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| ApiError::internal(format!("reading logits: {e:?}")))?;
            Ok(values.chunks(v).map(<[f32]>::to_vec).collect())
        };
        guarded("the forward", run)
    }
}

/// The running sequences and their caches, as one batch.
#[derive(Default)]
pub struct DecodeBatch {
    seqs: Vec<Sequence>,
    /// `[seqs.len(), …]` keys/values; `None` when empty.
    cache: Option<KvCache>,
    /// The attention mask over the cached slots, one row per sequence.
    mask: Vec<Vec<i64>>,
}

/// Give each sequence the logits of its row and count the tokens that generated; whether each
/// sequence goes on.
fn advance_all(seqs: &mut [Sequence], logits: &[Vec<f32>], metrics: &Metrics) -> Vec<bool> {
    let going: Vec<bool> = seqs
        .iter_mut()
        .zip(logits)
        .map(|(s, l)| s.advance(l))
        .collect();
    metrics
        .generated_tokens
        .fetch_add(going.len() as u64, Ordering::Relaxed);
    going
}

fn model_error(e: ModelError) -> ApiError {
    ApiError::internal(e.to_string())
}

/// Run `f`, turning a panic inside into an error of the requests concerned: the scheduler
/// thread that runs every step must never end because one step went wrong.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, ApiError>) -> Result<T, ApiError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        Err(ApiError::internal(format!(
            "{what} failed: {}",
            crate::adapters::panic_message(panic.as_ref())
        )))
    })
}

impl DecodeBatch {
    /// Sequences running.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether none runs.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Whether a running sequence uses `adapter`.
    pub fn uses(&self, adapter: &str) -> bool {
        self.seqs.iter().any(|s| s.adapter() == adapter)
    }

    /// Keep the sequences for which `keep` holds, in order.
    fn keep(&mut self, keep: &[bool]) -> Result<(), ApiError> {
        if keep.iter().all(|k| *k) {
            return Ok(());
        }
        let rows: Vec<usize> = (0..keep.len()).filter(|&i| keep[i]).collect();
        self.cache = match (&self.cache, rows.is_empty()) {
            (Some(cache), false) => Some(guarded("dropping finished sequences", || {
                cache.select_rows(&rows).map_err(model_error)
            })?),
            _ => None,
        };
        let mut i = 0;
        self.seqs.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        let mut i = 0;
        self.mask.retain(|_| {
            i += 1;
            keep[i - 1]
        });
        Ok(())
    }

    /// Drop sequences whose client disconnected or whose time is up.
    pub fn drop_dead(&mut self, now: Instant) {
        let keep: Vec<bool> = self.seqs.iter().map(|s| s.alive(now)).collect();
        if let Err(e) = self.keep(&keep) {
            self.fail_all(e);
        }
    }

    /// Fail every running sequence with `error` and start over empty.
    pub fn fail_all(&mut self, error: ApiError) {
        for s in &self.seqs {
            s.fail(error.clone());
        }
        *self = Self::default();
    }

    /// Run the prompts of `jobs` in one forward (left-padded, each row its adapter), send each
    /// its first token, and add those that go on to the batch. If the joint forward fails,
    /// each job is tried alone, so a failure is reported to its own request only.
    pub fn admit(&mut self, engine: &Engine, jobs: Vec<GenJob>) {
        if jobs.is_empty() {
            return;
        }
        let seqs: Vec<Sequence> = jobs
            .into_iter()
            .map(|j| Sequence::new(j, &engine.eos))
            .collect();
        match prefill(engine, &seqs) {
            Ok(done) => self.join(engine, seqs, done),
            Err(error) if seqs.len() == 1 => seqs[0].fail(error),
            Err(_) => {
                for seq in seqs {
                    match prefill(engine, std::slice::from_ref(&seq)) {
                        Ok(done) => self.join(engine, vec![seq], done),
                        Err(error) => seq.fail(error),
                    }
                }
            }
        }
    }

    fn join(&mut self, engine: &Engine, mut seqs: Vec<Sequence>, prefilled: Prefilled) {
        let Prefilled {
            cache,
            mask,
            logits,
        } = prefilled;
        let going = advance_all(&mut seqs, &logits, &engine.metrics);
        if !going.iter().any(|g| *g) {
            return;
        }
        let result = guarded("joining the running batch", || {
            let fresh = cache.split_rows(&mask).map_err(model_error)?;
            let mut parts = match &self.cache {
                Some(running) => running.split_rows(&self.mask).map_err(model_error)?,
                None => Vec::new(),
            };
            parts.extend(
                fresh
                    .into_iter()
                    .zip(&going)
                    .filter(|(_, g)| **g)
                    .map(|(p, _)| p),
            );
            KvCache::stack(&parts).map_err(model_error)
        });
        match result {
            Ok((cache, mask)) => {
                self.seqs.extend(
                    seqs.into_iter()
                        .zip(going)
                        .filter(|(_, g)| *g)
                        .map(|(s, _)| s),
                );
                self.cache = Some(cache);
                self.mask = mask;
            }
            Err(error) => {
                for (s, g) in seqs.iter().zip(&going) {
                    if *g {
                        s.fail(error.clone());
                    }
                }
                self.fail_all(error);
            }
        }
    }

    /// One decode step: one forward over every running sequence's last token; sends each its
    /// next token and drops those that finished.
    pub fn step(&mut self, engine: &Engine) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let ids: Vec<Vec<i64>> = self.seqs.iter().map(|s| vec![s.last]).collect();
        for row in &mut self.mask {
            row.push(1);
        }
        let adapters: Vec<&str> = self.seqs.iter().map(Sequence::adapter).collect();
        engine.metrics.record_batch(ids.len());
        match engine.last_logits(&ids, &self.mask, cache, &adapters) {
            Ok(logits) => {
                let going = advance_all(&mut self.seqs, &logits, &engine.metrics);
                if let Err(e) = self.keep(&going) {
                    self.fail_all(e);
                }
            }
            // The cache may hold this step for some layers only: no row can go on.
            Err(error) => self.fail_all(error),
        }
    }
}

struct Prefilled {
    cache: KvCache,
    mask: Vec<Vec<i64>>,
    logits: Vec<Vec<f32>>,
}

/// The prompts of `seqs` in one left-padded forward, as `generate_batch` runs them.
fn prefill(engine: &Engine, seqs: &[Sequence]) -> Result<Prefilled, ApiError> {
    let width = seqs.iter().map(|s| s.job.prompt.len()).max().unwrap_or(0);
    let pads: Vec<usize> = seqs.iter().map(|s| width - s.job.prompt.len()).collect();
    let ids: Vec<Vec<i64>> = seqs
        .iter()
        .zip(&pads)
        .map(|(s, &pad)| {
            let mut row = vec![0; pad];
            row.extend(&s.job.prompt);
            row
        })
        .collect();
    let mask: Vec<Vec<i64>> = pads
        .iter()
        .map(|&pad| (0..width).map(|j| i64::from(j >= pad)).collect())
        .collect();
    let mut cache = KvCache::new(engine.model.model().num_layers());
    cache.shift_rows(&pads.iter().map(|&p| -(p as i64)).collect::<Vec<_>>());
    let adapters: Vec<&str> = seqs.iter().map(Sequence::adapter).collect();
    engine.metrics.record_batch(seqs.len());
    engine.metrics.prompt_tokens.fetch_add(
        seqs.iter().map(|s| s.job.prompt.len() as u64).sum(),
        Ordering::Relaxed,
    );
    let logits = engine.last_logits(&ids, &mask, &mut cache, &adapters)?;
    Ok(Prefilled {
        cache,
        mask,
        logits,
    })
}
