//! Training never saves what it should not (issue 22, cases 12 and 13): a step whose gradient
//! is not finite stops the run before anything is written, no checkpoint holds a non-finite
//! tensor, settings that flip or break the update are refused before the run starts, and a run
//! never mixes with another run's folder or resumes another run's checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::{Device, Tensor, TensorData};
use peft_core::{
    AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, PeftError, PeftMethod,
    PeftModel, SiteInfo, SiteKind, TargetModules, TargetSpec, TensorSource,
};
use peft_lora::LoraConfig;
use peft_models::{HfModel, Task, from_pretrained};
use peft_train::data::Example;
use peft_train::optim::AdamWSettings;
use peft_train::{TrainConfig, TrainError, Trainer, checkpoint};

/// Burn's random generator is shared by the process: runs whose results are compared must
/// not interleave.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn bert_cls() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/bert_cls")
}

/// Rows whose tokens come from one of three id ranges, their class.
fn data(n: usize, seed: u64) -> Vec<Example> {
    (0..n)
        .map(|i| {
            let class = (i as u64 + seed) % 3;
            let ids: Vec<i64> = (0..5)
                .map(|k| 1 + class as i64 * 40 + ((i * 7 + k * 3) % 40) as i64)
                .collect();
            Example {
                label: Some(class as usize),
                token_type_ids: vec![0; ids.len()],
                input_ids: ids,
                labels: None,
                line: i + 1,
                segments: Vec::new(),
                image: None,
            }
        })
        .collect()
}

fn quick(steps: u64) -> TrainConfig {
    TrainConfig {
        epochs: 100,
        max_steps: Some(steps),
        batch_size: 4,
        learning_rate: 1e-2,
        save_every: Some(1),
        keep_last: 2,
        progress: false,
        ..Default::default()
    }
}

fn lora() -> LoraConfig {
    LoraConfig {
        r: 2,
        target_modules: Some(["query", "value"].into()),
        ..Default::default()
    }
}

fn trainer(method: &dyn PeftMethod, config: TrainConfig, out: &Path) -> Trainer<HfModel> {
    try_trainer(method, config, out).unwrap()
}

/// The trainer, or the builder's refusal of its settings.
fn try_trainer(
    method: &dyn PeftMethod,
    config: TrainConfig,
    out: &Path,
) -> Result<Trainer<HfModel>, TrainError> {
    let device = Device::flex().autodiff();
    device.seed(config.seed);
    let task = Task::SequenceClassification { num_labels: 3 };
    let pretrained = from_pretrained(bert_cls().to_str().unwrap(), task, &device).unwrap();
    let mut model = PeftModel::new(pretrained.model);
    model.add_adapter("default", method).unwrap();
    Trainer::builder(model, Task::SequenceClassification { num_labels: 3 })
        .adapters(["default"])
        .config(config)
        .output_dir(out.to_path_buf())
        .device(device)
        .build()
}

/// Every float in the saved tensors of each checkpoint under `out` (parameters and optimizer
/// moments) and of the bundles `adapter/` and `best/`.
fn saved_values(out: &Path) -> Vec<(PathBuf, f32)> {
    let mut values = Vec::new();
    for dir in checkpoint::list(&out.join("checkpoints")) {
        let loaded = checkpoint::load(&dir).unwrap();
        for data in loaded.params.values().chain(loaded.optimizer.1.values()) {
            let v = data.iter::<f32>().collect::<Vec<f32>>();
            values.extend(v.into_iter().map(|x| (dir.clone(), x)));
        }
    }
    for bundle in ["adapter", "best"] {
        let file = out.join(bundle).join("adapter_model.safetensors");
        let Ok(bytes) = std::fs::read(&file) else {
            continue;
        };
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (_, view) in st.tensors() {
            values.extend(
                view.data()
                    .chunks_exact(4)
                    .map(|b| (file.clone(), f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            );
        }
    }
    values
}

/// `y + sqrt(δ)` with `δ` starting at 0: the output (and so the loss) is finite, but the
/// gradient of `sqrt` at 0 is infinite. Before the fix the clip factor became 0, `0 · ∞` made
/// the parameters NaN, and the checkpoint saved right after held them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct SqrtOffset {
    target_modules: TargetModules,
}

#[derive(Debug)]
struct SqrtOffsetKernel;

#[typetag::serde(name = "SQRT_OFFSET")]
impl PeftMethod for SqrtOffset {
    fn targets(&self) -> TargetSpec {
        TargetSpec {
            target_modules: Some(self.target_modules.clone()),
            ..Default::default()
        }
    }

    fn supports(&self, kind: &SiteKind) -> bool {
        matches!(kind, SiteKind::Linear { .. })
    }

    fn create_adapter(&self, name: &str, site: &SiteInfo) -> peft_core::Result<AdapterState> {
        let SiteKind::Linear { d_output, .. } = site.kind else {
            return Err(PeftError::InvalidState("linear sites only".into()));
        };
        let delta = Tensor::<1>::zeros([d_output], &site.device);
        Ok(AdapterState::new(
            name,
            vec![],
            vec![delta],
            Arc::new(SqrtOffsetKernel),
        ))
    }

    fn clone_method(&self) -> Box<dyn PeftMethod> {
        Box::new(self.clone())
    }
}

impl AdapterKernel for SqrtOffsetKernel {
    fn forward_linear(
        &self,
        state: &AdapterState,
        _base: &BaseWeights,
        _x: Tensor<2>,
        y: Tensor<2>,
    ) -> Tensor<2> {
        y + state.vectors[0].val().sqrt().unsqueeze::<2>()
    }

    fn merge(
        &self,
        state: &mut AdapterState,
        _site: MergeInput<'_>,
        _direction: MergeDirection,
    ) -> peft_core::Result<BaseWeights> {
        Err(PeftError::InvalidState(format!(
            "`{}` does not merge",
            state.name
        )))
    }

    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> {
        vec![("delta".into(), state.vectors[0].val().into_data())]
    }

    fn import(
        &self,
        mut state: AdapterState,
        source: &mut dyn TensorSource,
    ) -> peft_core::Result<AdapterState> {
        let data = source.take("delta", &state.vectors[0].dims())?;
        state.set_vector(0, data);
        Ok(state)
    }
}

/// Case 12: an infinite gradient with a finite loss stops the run before the update, and no
/// checkpoint or bundle on disk holds a non-finite value.
#[test]
fn an_infinite_gradient_stops_the_run_before_any_write() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let method = SqrtOffset {
        target_modules: ["query"].into(),
    };
    let mut t = trainer(&method, quick(3), out.path());
    let result = t.train(&data(16, 0), Some(&data(6, 1)), None);
    let bad: Vec<_> = saved_values(out.path())
        .into_iter()
        .filter(|(_, v)| !v.is_finite())
        .collect();
    assert!(
        bad.is_empty(),
        "{result:?}: non-finite values were saved: {:?}",
        &bad[..bad.len().min(3)]
    );
    let err = result.expect_err("a run whose gradient is infinite cannot succeed");
    // Stopped at the first step, by its gradient (not one step late, by the loss).
    assert!(err.to_string().contains("gradient"), "{err}");
    assert!(checkpoint::list(&out.path().join("checkpoints")).is_empty());
}

/// Case 12: a checkpoint of parameters that are not finite is refused and nothing is written
/// (whatever made them so).
#[test]
fn a_checkpoint_of_non_finite_parameters_is_refused() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let mut t = trainer(&lora(), quick(1), out.path());
    t.train(&data(8, 0), None, None).unwrap();
    let ckpt = checkpoint::latest(&out.path().join("checkpoints")).unwrap();
    let mut loaded = checkpoint::load(&ckpt).unwrap();
    let (path, value) = loaded.params.iter_mut().next().unwrap();
    let shape = value.shape().to_vec();
    let mut poisoned = value.iter::<f32>().collect::<Vec<f32>>();
    poisoned[0] = f32::NAN;
    *value = TensorData::new(poisoned, shape);
    let path = path.clone();
    checkpoint::restore_params(t.model_mut(), &loaded.params, &ckpt).unwrap();
    let mut state = loaded.state.clone();
    state.step += 1;
    let optim = peft_train::optim::AdamW::new(AdamWSettings::default());
    let root = out.path().join("checkpoints");
    let err = checkpoint::save(&root, t.model(), t.adapters(), &optim, &state, 5)
        .expect_err("a NaN parameter cannot be checkpointed");
    assert!(err.to_string().contains(&path), "{err}");
    assert!(!root.join(checkpoint::checkpoint_name(state.step)).exists());
    assert_eq!(checkpoint::list(&root), vec![ckpt]);
}

/// Case 12: settings that make the update NaN, flip its sign or never let it stop are
/// refused before anything runs or is written, naming the key.
#[test]
fn out_of_range_settings_are_refused_before_the_run() {
    let _serial = serial();
    let adamw = |f: &dyn Fn(&mut AdamWSettings)| {
        let mut s = AdamWSettings::default();
        f(&mut s);
        s
    };
    let cases: Vec<(&str, TrainConfig)> = vec![
        (
            "learning_rate",
            TrainConfig {
                learning_rate: f64::NAN,
                ..quick(1)
            },
        ),
        (
            "learning_rate",
            TrainConfig {
                learning_rate: -1e-3,
                ..quick(1)
            },
        ),
        (
            "max_grad_norm",
            TrainConfig {
                max_grad_norm: Some(0.0),
                ..quick(1)
            },
        ),
        (
            "max_grad_norm",
            TrainConfig {
                max_grad_norm: Some(-1.0),
                ..quick(1)
            },
        ),
        (
            "eps",
            TrainConfig {
                adamw: adamw(&|s| s.eps = 0.0),
                ..quick(1)
            },
        ),
        (
            "beta1",
            TrainConfig {
                adamw: adamw(&|s| s.beta1 = 1.0),
                ..quick(1)
            },
        ),
        (
            "beta2",
            TrainConfig {
                adamw: adamw(&|s| s.beta2 = -0.5),
                ..quick(1)
            },
        ),
        (
            "weight_decay",
            TrainConfig {
                adamw: adamw(&|s| s.weight_decay = f64::INFINITY),
                ..quick(1)
            },
        ),
        (
            "early_stopping_patience",
            TrainConfig {
                early_stopping_patience: Some(0),
                ..quick(1)
            },
        ),
        (
            "warmup_ratio",
            TrainConfig {
                warmup_ratio: 1.5,
                ..quick(1)
            },
        ),
    ];
    for (key, config) in cases {
        let out = tempfile::tempdir().unwrap();
        // Refused when the trainer is built, before any run can start.
        let err = try_trainer(&lora(), config, out.path()).err().expect(key);
        assert!(
            matches!(&err, TrainError::Config { key: k, .. } if k.ends_with(key)),
            "{key}: {err:?}"
        );
        assert!(err.is_bad_input());
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0, "{key}");
    }
}

/// Case 13: a second run into a folder that holds a run is refused, and the first run's
/// checkpoints stay as they were (before the fix `keep_last` pruned by name across both
/// runs and could delete the new run's newest checkpoint).
#[test]
fn a_second_run_into_the_same_folder_is_refused() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let mut first = trainer(&lora(), quick(6), out.path());
    first.train(&data(16, 0), None, None).unwrap();
    let root = out.path().join("checkpoints");
    let before = checkpoint::list(&root);
    assert_eq!(before.len(), 2);
    let config = TrainConfig {
        seed: 7,
        ..quick(2)
    };
    let mut second = trainer(&lora(), config, out.path());
    let err = second
        .train(&data(16, 0), None, None)
        .expect_err("the folder holds another run");
    assert!(err.is_bad_input(), "{err:?}");
    assert!(err.to_string().contains("overwrite"), "{err}");
    assert_eq!(checkpoint::list(&root), before);
}

/// Case 13: resuming a checkpoint written with another seed, batch size or data is refused
/// (before the fix it resumed silently when the shapes matched).
#[test]
fn resuming_another_runs_checkpoint_is_refused() {
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let mut first = trainer(&lora(), quick(2), out.path());
    first.train(&data(16, 0), None, None).unwrap();
    let ckpt = checkpoint::latest(&out.path().join("checkpoints")).unwrap();
    let cases: Vec<(&str, TrainConfig, Vec<Example>)> = vec![
        (
            "seed",
            TrainConfig {
                seed: 9,
                ..quick(4)
            },
            data(16, 0),
        ),
        (
            "batch_size",
            TrainConfig {
                batch_size: 8,
                ..quick(4)
            },
            data(16, 0),
        ),
        ("train data", quick(4), data(16, 2)),
    ];
    for (what, config, train) in cases {
        let mut t = trainer(&lora(), config, out.path());
        let err = t.train(&train, None, Some(&ckpt)).expect_err(what);
        assert!(
            matches!(err, TrainError::Checkpoint { .. }),
            "{what}: {err:?}"
        );
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
    // The same run goes on (a longer `max_steps` is not another run).
    let mut same = trainer(&lora(), quick(4), out.path());
    let report = same.train(&data(16, 0), None, Some(&ckpt)).unwrap();
    assert_eq!(report.steps, 4);
}
