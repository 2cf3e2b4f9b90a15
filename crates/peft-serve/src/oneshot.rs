//! Embeddings and classification requests in the scheduler: their inputs run in chunks of at
//! most `max_batch` rows, one chunk per scheduler round, all adapters together.
//!
//! One request used to be one forward over all its inputs padded to the longest: a request of
//! 200,000 tiny inputs and one long one allocated 200,000 rows of the long one's length, and an
//! honest request of 1,000 long inputs held the scheduler (loads, unloads, other requests)
//! for its whole forward. Chunks bound every forward to `max_batch` rows of at most the
//! model's positions, and between chunks the scheduler takes commands, drops requests whose
//! client left and runs a decode step.

use std::collections::VecDeque;
use std::time::Instant;

use burn::tensor::{Int, Tensor, TensorData};
use peft_models::{Encoding, ModelInputs};

use crate::batch::Engine;
use crate::error::ApiError;
use crate::job::{OneShotJob, OneShotKind};

/// One request and how far it got.
struct Work {
    job: OneShotJob,
    /// Inputs done (sent to a forward), in order.
    next: usize,
    /// One vector per input, by input index, once its forward ran.
    results: Vec<Option<Vec<f32>>>,
    /// Set once a forward of its inputs failed: the request fails, its other inputs are
    /// skipped.
    failure: Option<ApiError>,
}

impl Work {
    fn started(&self) -> bool {
        self.next > 0 || self.failure.is_some()
    }

    fn finished(&self) -> bool {
        self.failure.is_some() || self.next == self.job.inputs.len()
    }
}

/// The embeddings and classification requests the scheduler holds, oldest first.
#[derive(Default)]
pub(crate) struct OneShots {
    works: VecDeque<Work>,
}

impl OneShots {
    /// Queue a request.
    pub fn push(&mut self, job: OneShotJob) {
        let results = vec![None; job.inputs.len()];
        self.works.push_back(Work {
            job,
            next: 0,
            results,
            failure: None,
        });
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.works.is_empty()
    }

    /// Whether a held request uses `adapter`.
    pub fn uses(&self, adapter: &str) -> bool {
        self.works.iter().any(|w| w.job.adapter == adapter)
    }

    /// Drop requests whose client left or whose time is up; how many of them had not started
    /// (they leave the queue count).
    pub fn drop_dead(&mut self, now: Instant) -> usize {
        let mut unstarted = 0;
        self.works.retain(|w| {
            let alive = !w.job.reply.is_closed() && now < w.job.deadline;
            if !alive && !w.started() {
                unstarted += 1;
            }
            alive
        });
        unstarted
    }

    /// Fail the requests that have started (a round of the scheduler panicked while they
    /// were in it).
    pub fn fail_started(&mut self, error: &ApiError) {
        let (started, waiting): (Vec<Work>, Vec<Work>) =
            self.works.drain(..).partition(Work::started);
        for work in started {
            let _ = work.job.reply.send(Err(error.clone()));
        }
        self.works = waiting.into();
    }

    /// Run one chunk: the next inputs, at most `max_batch` rows, oldest requests first; answer
    /// the requests that are complete. Returns how many requests started (left the queue).
    pub fn run_chunk(&mut self, engine: &Engine, max_batch: usize) -> usize {
        let mut rows: Vec<(usize, usize)> = Vec::new();
        let mut started = 0;
        for (w, work) in self.works.iter_mut().enumerate() {
            let room = max_batch.max(1) - rows.len();
            if room == 0 {
                break;
            }
            if work.finished() {
                continue;
            }
            if !work.started() {
                started += 1;
            }
            let take = room.min(work.job.inputs.len() - work.next);
            rows.extend((work.next..work.next + take).map(|i| (w, i)));
            work.next += take;
        }
        if !rows.is_empty() {
            self.forward_rows(engine, &rows);
        }
        self.reply_finished();
        started
    }

    /// Forward `rows` (`(request, input)`), each with its request's adapter. Encoders take a
    /// right-padded batch with its mask; decoder classifiers pool the last token, so they
    /// batch only inputs of one length.
    fn forward_rows(&mut self, engine: &Engine, rows: &[(usize, usize)]) {
        let mut groups: Vec<Vec<(usize, usize)>> = Vec::new();
        if engine.model.model().arch().attends_bidirectionally() {
            groups.push(rows.to_vec());
        } else {
            for &row in rows {
                let len = self.works[row.0].job.inputs[row.1].ids.len();
                let works = &self.works;
                match groups
                    .iter_mut()
                    .find(|g| works[g[0].0].job.inputs[g[0].1].ids.len() == len)
                {
                    Some(g) => g.push(row),
                    None => groups.push(vec![row]),
                }
            }
        }
        for group in groups {
            let encodings: Vec<&Encoding> = group
                .iter()
                .map(|&(w, i)| &self.works[w].job.inputs[i])
                .collect();
            let adapters: Vec<&str> = group
                .iter()
                .map(|&(w, _)| self.works[w].job.adapter.as_str())
                .collect();
            let kind = self.works[group[0].0].job.kind;
            engine.metrics.record_batch(group.len());
            match forward(engine, kind, &encodings, &adapters) {
                // A decoder's groups split a request by length: results go by input index.
                Ok(out) => {
                    for (&(w, i), v) in group.iter().zip(out) {
                        self.works[w].results[i] = Some(v);
                    }
                }
                Err(e) => {
                    for &(w, _) in &group {
                        self.works[w].failure = Some(e.clone());
                    }
                }
            }
        }
    }

    /// Answer and drop every complete request.
    fn reply_finished(&mut self) {
        let (done, pending): (Vec<Work>, Vec<Work>) =
            self.works.drain(..).partition(Work::finished);
        self.works = pending.into();
        for work in done {
            let answer = match work.failure {
                Some(e) => Err(e),
                None => Ok(work
                    .results
                    .into_iter()
                    .map(Option::unwrap_or_default)
                    .collect()),
            };
            let _ = work.job.reply.send(answer);
        }
    }
}

/// One forward over `encodings`, row `i` with adapter `adapters[i]`: one vector per row
/// (embedding or logits). A panic inside is this chunk's error, never the scheduler's end.
fn forward(
    engine: &Engine,
    kind: OneShotKind,
    encodings: &[&Encoding],
    adapters: &[&str],
) -> Result<Vec<Vec<f32>>, ApiError> {
    let run = || -> Result<Vec<Vec<f32>>, ApiError> {
        let device = &engine.device;
        let b = encodings.len();
        let s = encodings.iter().map(|e| e.ids.len()).max().unwrap_or(1);
        let cells = b
            .checked_mul(s)
            .ok_or_else(|| ApiError::internal("the batch is too large"))?;
        let mut ids = vec![0i64; cells];
        let mut mask = vec![0i64; cells];
        let mut types = vec![0i64; cells];
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
            pixel_values: None,
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
        Ok(values.chunks(width.max(1)).map(<[f32]>::to_vec).collect())
    };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|panic| {
        Err(ApiError::internal(format!(
            "the forward failed: {}",
            crate::adapters::panic_message(panic.as_ref())
        )))
    })
}
