//! Saves survive a crash. A child process saves in a loop (adapter bundles of two different
//! configs, or training checkpoints) and is killed with SIGKILL at a different moment in each
//! trial; what is on disk afterwards always loads and is one complete save: never a config
//! from one save paired with weights from another (the two files of a bundle used to be renamed
//! one after the other), never a half-written checkpoint.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use burn::module::Module;
use burn::tensor::Device;
use burn_peft::core::nn::{Linear, LinearConfig};
use burn_peft::core::{Adaptable, PeftModel, TargetModules, bundle};
use burn_peft::lora::{InitLoraWeights, LoraConfig};

const CHILD_DIR: &str = "BURN_PEFT_CRASH_CHILD_DIR";
/// What a child prints after each complete save (libtest may print its own text in front).
const SAVED: &str = "crash-child-saved";

#[derive(Module, Debug, Adaptable)]
#[peft(crate = "burn_peft::core")]
struct Wide {
    layers: Vec<Linear>,
}

/// A model big enough that a save takes a few milliseconds, with a seeded random adapter of
/// rank `r` (the child and the parent build the same one).
fn model(r: usize) -> PeftModel<Wide> {
    // Burn's RNG is process-wide: tests building models at the same time would interleave
    // their draws between `seed` and `init`, and the "same" model would differ.
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _draws = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex();
    device.seed(7);
    let wide = Wide {
        layers: (0..6)
            .map(|_| LinearConfig::new(512, 512).init(&device))
            .collect(),
    };
    let mut model = PeftModel::new(wide);
    let config = LoraConfig {
        r,
        lora_alpha: 16.0,
        target_modules: Some(TargetModules::Regex(r"layers\.\d+".into())),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    };
    device.seed(100 + r as u64);
    model.add_adapter("default", &config).unwrap();
    model
}

/// Spawn this test binary running only `test` as the child, saving into `dir`; returns once
/// it has completed its first save.
fn spawn_child(test: &str, dir: &Path) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            test,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines
            .next()
            .expect("the child exits only when killed")
            .unwrap();
        if line.contains(SAVED) {
            break;
        }
    }
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

fn kill(mut child: Child, after: Duration) {
    std::thread::sleep(after);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

#[test]
#[ignore = "the child of killed_bundle_saves_leave_one_complete_bundle; run by it"]
fn child_saves_bundles_forever() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let models = [model(4), model(32)];
    for i in 0.. {
        models[i % 2].save_adapter(&dir, "default").unwrap();
        println!("{SAVED} {i}");
    }
}

fn files(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(dir.join(bundle::CONFIG_FILE)).unwrap(),
        std::fs::read(dir.join(bundle::WEIGHTS_FILE)).unwrap(),
    )
}

#[test]
fn killed_bundle_saves_leave_one_complete_bundle() {
    let root = tempfile::tempdir().unwrap();
    let references: Vec<(Vec<u8>, Vec<u8>)> = [4, 32]
        .into_iter()
        .map(|r| {
            let dir = root.path().join(format!("reference-r{r}"));
            model(r).save_adapter(&dir, "default").unwrap();
            files(&dir)
        })
        .collect();
    let dir = root.path().join("bundles").join("adapter");
    // Another adapter's folder inside the bundle folder (PEFT's layout) must survive too.
    std::fs::create_dir_all(dir.join("second")).unwrap();
    for file in [bundle::CONFIG_FILE, bundle::WEIGHTS_FILE] {
        std::fs::copy(
            root.path().join("reference-r4").join(file),
            dir.join("second").join(file),
        )
        .unwrap();
    }
    let second = files(&dir.join("second"));
    let mut seen = [false, false];
    for trial in 0..20u64 {
        let child = spawn_child("child_saves_bundles_forever", &dir);
        kill(child, Duration::from_micros(2500 * trial));
        let found = files(&dir);
        let which = references
            .iter()
            .position(|r| *r == found)
            .unwrap_or_else(|| panic!("trial {trial}: the bundle on disk is neither save"));
        seen[which] = true;
        let mut loaded = PeftModel::new(model(4).unload());
        loaded.load_adapter(&dir, "default").unwrap();
        assert_eq!(files(&dir.join("second")), second, "trial {trial}");
    }
    assert!(seen.iter().all(|s| *s), "both saves were seen: {seen:?}");
    // The next save cleans up what killed writers left beside the folder.
    model(4).save_adapter(&dir, "default").unwrap();
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p != &dir)
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

mod checkpoints {
    use super::*;
    use burn_peft::models::{HfModel, Task, from_pretrained};
    use burn_peft::train::checkpoint;
    use burn_peft::train::data::Example;
    use burn_peft::train::schedule::Schedule;
    use burn_peft::train::{TrainConfig, Trainer};

    fn examples() -> Vec<Example> {
        (0..16)
            .map(|i| {
                let ids: Vec<i64> = (0..6).map(|k| 1 + (i * 5 + k * 11) % 120).collect();
                Example {
                    token_type_ids: vec![0; ids.len()],
                    input_ids: ids,
                    label: Some(i as usize % 3),
                    labels: None,
                    line: 0,
                    segments: Vec::new(),
                    image: None,
                }
            })
            .collect()
    }

    fn trainer(out: &Path, max_steps: u64) -> Trainer<HfModel> {
        let device = Device::flex().autodiff();
        let model_dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/bert_cls");
        let pretrained = from_pretrained(
            model_dir.to_str().unwrap(),
            Task::SequenceClassification { num_labels: 3 },
            &device,
        )
        .unwrap();
        let mut model = PeftModel::new(pretrained.model);
        let lora = LoraConfig {
            r: 4,
            target_modules: Some(["query", "value"].into()),
            modules_to_save: Some(vec!["classifier".into()]),
            ..Default::default()
        };
        model.add_adapter("default", &lora).unwrap();
        Trainer::builder(model, Task::SequenceClassification { num_labels: 3 })
            .adapters(["default"])
            .config(TrainConfig {
                epochs: 1_000_000,
                max_steps: Some(max_steps),
                batch_size: 4,
                save_every: Some(1),
                keep_last: 3,
                learning_rate: 1e-2,
                schedule: Schedule::Constant,
                progress: false,
                ..Default::default()
            })
            .output_dir(out.to_path_buf())
            .device(device)
            .build()
            .unwrap()
    }

    #[test]
    #[ignore = "the child of killed_training_leaves_resumable_checkpoints; run by it"]
    fn child_trains_forever() {
        let Ok(dir) = std::env::var(CHILD_DIR) else {
            return;
        };
        let dir = PathBuf::from(dir);
        // Signal once a first checkpoint exists, then keep saving one per step.
        let mut first = trainer(&dir, 1);
        first.train(&examples(), None, None).unwrap();
        println!("{SAVED} 1");
        let latest = checkpoint::latest(&dir.join("checkpoints")).unwrap();
        let mut t = trainer(&dir, u64::MAX);
        t.train(&examples(), None, Some(&latest)).unwrap();
    }

    #[test]
    fn killed_training_leaves_resumable_checkpoints() {
        for trial in 0..6u64 {
            let out = tempfile::tempdir().unwrap();
            let child = spawn_child("checkpoints::child_trains_forever", out.path());
            kill(child, Duration::from_millis(40 + 35 * trial));
            let root = out.path().join("checkpoints");
            let all = checkpoint::list(&root);
            assert!(!all.is_empty(), "trial {trial}");
            for dir in &all {
                checkpoint::load(dir).unwrap_or_else(|e| panic!("trial {trial}: {e}"));
            }
            let latest = checkpoint::latest(&root).unwrap();
            let step = checkpoint::load(&latest).unwrap().state.step;
            let mut t = trainer(out.path(), step + 1);
            let report = t.train(&examples(), None, Some(&latest)).unwrap();
            assert_eq!(report.steps, step + 1, "trial {trial}");
        }
    }
}
