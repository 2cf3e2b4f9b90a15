//! Which run an output folder and a checkpoint belong to.
//!
//! A run is described by what decides its trajectory and its best adapter: the adapters'
//! configs, the objective, the optimizer and schedule settings, the batch size, the seed and
//! the data (a digest of the tokenized examples). `epochs`, `max_steps` and the logging and
//! saving cadence are not part of it: resuming with a larger `max_steps` continues the same
//! run. The record goes into `<output>/run.json` and into every checkpoint's
//! `trainer_state.json`.
//!
//! Without it, a second run into the same folder mixed with the first (`keep_last` pruned by
//! name across both and could delete the new run's newest checkpoint), and `--resume latest`
//! resumed another run's checkpoint whenever the shapes matched.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::data::Example;
use crate::error::{Result, TrainError};
use crate::trainer::TrainConfig;

/// The file in the output folder that names the run writing into it.
pub const RUN_FILE: &str = "run.json";

/// What a run may do to an existing output folder or checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrainOptions {
    /// Start over in an output folder that holds a run: its checkpoints, bundles and
    /// TensorBoard files are removed first (`burn-peft train --overwrite`).
    pub overwrite: bool,
    /// Resume a checkpoint written by another run config (`--force-resume`).
    pub force_resume: bool,
}

/// FNV-1a, 64 bits: a stable digest (not a defence against tampering, only a way to tell
/// whether two runs saw the same data).
fn fnv1a(state: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *state ^= u64::from(*b);
        *state = state.wrapping_mul(0x0100_0000_01b3);
    }
}

/// A digest of tokenized examples: their count and a hash of every id and label.
pub fn data_digest(examples: &[Example]) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for e in examples {
        for list in [&e.input_ids, &e.token_type_ids] {
            fnv1a(&mut h, &(list.len() as u64).to_le_bytes());
            list.iter().for_each(|v| fnv1a(&mut h, &v.to_le_bytes()));
        }
        let label = e.label.map_or(u64::MAX, |l| l as u64);
        fnv1a(&mut h, &label.to_le_bytes());
        let labels = e.labels.as_deref().unwrap_or_default();
        fnv1a(&mut h, &(labels.len() as u64).to_le_bytes());
        labels.iter().for_each(|v| fnv1a(&mut h, &v.to_le_bytes()));
        // Packed rows: where the examples split (absent for plain examples, so their digest
        // is what it was before packing existed).
        if !e.segments.is_empty() {
            fnv1a(&mut h, &(e.segments.len() as u64).to_le_bytes());
            e.segments
                .iter()
                .for_each(|n| fnv1a(&mut h, &(*n as u64).to_le_bytes()));
        }
    }
    format!("{} examples, fnv1a {h:016x}", examples.len())
}

/// The record of a run (see the module docs): a JSON object whose top-level keys name what
/// differs between two runs.
pub fn record(
    config: &TrainConfig,
    adapters: &[(String, Value)],
    objective: &str,
    pad_id: i64,
    train: &[Example],
    eval: Option<&[Example]>,
) -> Value {
    let mut out = Map::new();
    let mut put = |k: &str, v: Value| {
        out.insert(k.to_string(), v);
    };
    put("adapters", json!(adapters));
    put("objective", json!(objective));
    put("pad_id", json!(pad_id));
    put("batch_size", json!(config.batch_size));
    put("grad_accum", json!(config.grad_accum));
    put("learning_rate", json!(config.learning_rate));
    put("schedule", json!(config.schedule));
    put("warmup_steps", json!(config.warmup_steps));
    put("warmup_ratio", json!(config.warmup_ratio));
    put("adamw", json!(config.adamw));
    put("max_grad_norm", json!(config.max_grad_norm));
    put("metric", json!(config.metric));
    put("seed", json!(config.seed));
    put("train data", json!(data_digest(train)));
    put("eval data", json!(eval.map(data_digest)));
    Value::Object(out)
}

/// The keys in which two records differ, in order.
pub fn differences(a: &Value, b: &Value) -> Vec<String> {
    let empty = Map::new();
    let (a, b) = (
        a.as_object().unwrap_or(&empty),
        b.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// The record in `<dir>/run.json`, if there is one that reads.
pub fn read(dir: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(RUN_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Write `record` to `<dir>/run.json` (atomically).
pub fn write(dir: &Path, record: &Value) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(record).map_err(|e| TrainError::Config {
        key: "run".into(),
        reason: format!("the run record does not serialize: {e}"),
    })?;
    peft_core::atomic::write_file(&dir.join(RUN_FILE), &bytes)?;
    Ok(())
}

/// What a trainer writes into its output folder (and `--overwrite` removes).
const RUN_ENTRIES: &[&str] = &["checkpoints", "best", "adapter", "model", "runs"];

/// Check that a fresh run (not a resume) may write into `dir`, or clear `dir` when
/// `overwrite`: a folder that holds checkpoints, or the record of another run, is another
/// run's (or this run's, to continue with `--resume latest`).
pub fn claim_fresh(dir: &Path, record: &Value, overwrite: bool) -> Result<()> {
    let checkpoints = crate::checkpoint::list(&dir.join("checkpoints"));
    let other = read(dir).filter(|r| r != record);
    if overwrite {
        for entry in RUN_ENTRIES {
            let path = dir.join(entry);
            if path.is_dir() {
                peft_core::atomic::remove_dir(&path)?;
            }
        }
        let file = dir.join(RUN_FILE);
        if file.is_file() {
            std::fs::remove_file(&file).map_err(|source| TrainError::Io { file, source })?;
        }
        return Ok(());
    }
    let held = match (checkpoints.last(), &other) {
        (Some(latest), _) => format!(
            "holds the checkpoints of a run (the latest is {})",
            latest.display()
        ),
        (None, Some(other)) => format!(
            "holds another run (its {} differ from this config's)",
            differences(other, record).join(", ")
        ),
        (None, None) => return Ok(()),
    };
    Err(TrainError::OutputInUse {
        dir: dir.to_path_buf(),
        reason: format!(
            "{held}; continue that run with --resume latest, start over with --overwrite (its \
             checkpoints and bundles are removed), or choose another output folder"
        ),
    })
}

/// Check that the checkpoint `dir`, written by the run `saved`, may be resumed by the run
/// `record` (into `output`, whose own record is checked too).
pub fn check_resume(
    dir: &Path,
    saved: Option<&Value>,
    output: &Path,
    record: &Value,
    force: bool,
) -> Result<()> {
    if force {
        return Ok(());
    }
    // A checkpoint from before run records: nothing to compare.
    if let Some(saved) = saved
        && saved != record
    {
        return Err(TrainError::Checkpoint {
            dir: dir.to_path_buf(),
            reason: format!(
                "it was written by another run: its {} differ from this config's. Resume it \
                 with the config that wrote it, start a new run in another output folder, or \
                 pass --force-resume to continue with this config anyway",
                differences(saved, record).join(", ")
            ),
        });
    }
    if let Some(other) = read(output).filter(|r| r != record) {
        return Err(TrainError::OutputInUse {
            dir: output.to_path_buf(),
            reason: format!(
                "holds another run (its {} differ from this config's); resume into that run's \
                 own folder, or pass --force-resume",
                differences(&other, record).join(", ")
            ),
        });
    }
    Ok(())
}

/// The folder of a run's output that holds its checkpoints.
pub fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}
