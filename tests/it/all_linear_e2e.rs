//! `target_modules: all-linear` through the trainer, on every model family of the zoo, gives
//! exactly PEFT's adapter: the same tensors in the bundle and the same trainable count
//! (`tests/fixtures/gen/all_linear_tiny.py` records what PEFT does on the same models). PEFT
//! never adapts the output embeddings (`lm_head`), and leaves out a classifier head only when the
//! task type is `SEQ_CLS`.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use burn_peft::core::{PeftMethod, PeftModel, bundle};
use burn_peft::models::{Task, from_pretrained};
use burn_peft::train::data::Example;
use burn_peft::train::schedule::Schedule;
use burn_peft::train::{TrainConfig, Trainer};
use serde_json::{Value, json};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(root().join("all_linear.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The LoRA config PEFT was given, as PEFT writes it (`modules_to_save` included).
fn method(case: &Value) -> Box<dyn PeftMethod> {
    let mut config = json!({
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": "all-linear",
        "task_type": case["task_type"],
    });
    if !case["modules_to_save"].is_null() {
        config["modules_to_save"] = case["modules_to_save"].clone();
    }
    bundle::parse_config_value(config, None).unwrap().method
}

fn task(case: &Value) -> (Task, Option<Task>) {
    match case["class"].as_str().unwrap() {
        "BertModel" => (Task::Encoder, None),
        c if c.ends_with("ForSequenceClassification") => (
            Task::SequenceClassification { num_labels: 3 },
            Some(Task::SequenceClassification { num_labels: 3 }),
        ),
        _ => (Task::CausalLm, Some(Task::CausalLm)),
    }
}

fn examples(objective: Task) -> Vec<Example> {
    (0..8)
        .map(|i| {
            let ids: Vec<i64> = (0..6).map(|k| 1 + (i * 7 + k * 3) % 120).collect();
            Example {
                token_type_ids: vec![0; ids.len()],
                label: matches!(objective, Task::SequenceClassification { .. })
                    .then_some(i as usize % 3),
                labels: matches!(objective, Task::CausalLm).then(|| ids.clone()),
                input_ids: ids,
                line: 0,
                segments: Vec::new(),
                image: None,
            }
        })
        .collect()
}

fn saved_keys(dir: &Path) -> Vec<String> {
    let bytes = std::fs::read(dir.join(bundle::WEIGHTS_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut keys: Vec<String> = st.names().into_iter().map(String::from).collect();
    keys.sort();
    keys
}

fn strings(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

#[test]
fn all_linear_through_the_trainer_gives_peft_keys_and_counts_on_every_family() {
    let reference = reference();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let folder = root().join("models").join(case["model"].as_str().unwrap());
        let (task, objective) = task(case);
        let device = Device::flex().autodiff();
        let pretrained = from_pretrained(folder.to_str().unwrap(), task, &device).unwrap();
        let mut model = PeftModel::new(pretrained.model);
        model.add_adapter("default", method(case).as_ref()).unwrap();
        let report = model.trainable_report();
        assert_eq!(
            report.trainable as u64,
            case["trainable"].as_u64().unwrap(),
            "{name}: trainable"
        );
        assert_eq!(
            report.all as u64,
            case["all"].as_u64().unwrap(),
            "{name}: all params"
        );
        let out = tempfile::tempdir().unwrap();
        let bundle_dir = match objective {
            // A bare encoder has no training objective: save the injected adapter directly.
            None => {
                model.save_adapter(out.path(), "default").unwrap();
                out.path().to_path_buf()
            }
            Some(objective) => {
                let mut trainer = Trainer::builder(model, objective)
                    .adapters(["default"])
                    .config(TrainConfig {
                        epochs: 1,
                        max_steps: Some(2),
                        batch_size: 4,
                        learning_rate: 5e-2,
                        schedule: Schedule::Constant,
                        progress: false,
                        ..Default::default()
                    })
                    .output_dir(out.path().to_path_buf())
                    .device(device)
                    .build()
                    .unwrap();
                let result = trainer.train(&examples(objective), None, None).unwrap();
                assert_eq!(result.steps, 2, "{name}");
                result.adapter_dir
            }
        };
        assert_eq!(
            saved_keys(&bundle_dir),
            strings(&case["keys"]),
            "{name}: bundle keys"
        );
        for excluded in strings(&case["excluded"]) {
            assert!(
                !saved_keys(&bundle_dir)
                    .iter()
                    .any(|k| k.contains(&format!("{excluded}.lora_"))),
                "{name}: `{excluded}` must not get LoRA"
            );
        }
    }
}
