//! LoRA and prefix tuning trained together from one YAML (`methods:` map or a `method:`
//! list), the base frozen: each adapter is its own PEFT bundle under `adapter/<name>/` that
//! loads alone, and `eval` / `forward` / `generate` take several `--adapter`s active at once and
//! reproduce the run's own held-out score.

use std::path::Path;

use peft_core::thousands;
use serde_json::{Value, json};
// The methods the bundles use are registered by linking their crates.
use peft_lora as _;
use peft_prefix as _;

mod common;

use common::{burn_peft, model_with_tokenizer, sentence, text};

fn data(n: usize) -> String {
    (0..n)
        .map(|i| {
            let label = ["a", "b", "c"][i % 3];
            json!({"text": sentence(8 + i % 5, i * (1 + i % 3)), "label": label}).to_string() + "\n"
        })
        .collect()
}

fn run_config(dir: &Path, model: &Path, methods: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("train.jsonl"), data(24)).unwrap();
    std::fs::write(dir.join("test.jsonl"), data(9)).unwrap();
    let yaml = format!(
        "model:\n  name_or_path: {}\n  task: classification\n{methods}\ndata:\n  train: train.jsonl\n  eval: test.jsonl\n  test: test.jsonl\n  max_length: 16\ntrain:\n  epochs: 1\n  max_steps: 4\n  batch_size: 6\n  learning_rate: 5.0e-2\n  schedule: constant\n  progress: false\noutput: out\n",
        model.display()
    );
    let file = dir.join("run.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

fn load_ok(model: &Path, bundle: &Path, name: &str) {
    let pretrained = peft_models::from_pretrained(
        model.to_str().unwrap(),
        peft_models::Task::SequenceClassification { num_labels: 3 },
        &burn::tensor::Device::flex(),
    )
    .unwrap();
    let mut peft = peft_core::PeftModel::new(pretrained.model);
    peft.load_adapter(bundle, name).unwrap();
}

#[test]
fn lora_and_prefix_train_together_and_are_saved_as_separate_bundles() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_with_tokenizer(tmp.path(), "bert_cls");
    let methods = "methods:\n  lora:\n    peft_type: LORA\n    r: 4\n    lora_alpha: 8\n    target_modules: [query, value]\n  prefix:\n    peft_type: PREFIX_TUNING\n    num_virtual_tokens: 4";
    let run = run_config(tmp.path(), &model, methods);
    let out = burn_peft().arg("train").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("LORA + PREFIX_TUNING"), "{stdout}");
    let root = tmp.path().join("out");
    for name in ["lora", "prefix"] {
        for folder in ["adapter", "best"] {
            let bundle = root.join(folder).join(name);
            assert!(
                bundle.join("adapter_config.json").is_file(),
                "{}",
                bundle.display()
            );
            assert!(bundle.join("label_map.json").is_file());
            load_ok(&model, &bundle, name);
        }
    }
    // The classifier head trains once, with the first adapter.
    let keys = |name: &str| {
        let bytes = std::fs::read(
            root.join("adapter")
                .join(name)
                .join("adapter_model.safetensors"),
        )
        .unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.names().into_iter().map(String::from).collect::<Vec<_>>()
    };
    assert!(keys("lora").iter().any(|k| k.contains("classifier")));
    assert!(keys("prefix").iter().all(|k| !k.contains("classifier")));
    // Every adapter's parameters are counted as trainable: the sum of the two bundles' sizes.
    let numel = |name: &str| {
        let bytes = std::fs::read(
            root.join("adapter")
                .join(name)
                .join("adapter_model.safetensors"),
        )
        .unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .iter()
            .map(|(_, t)| t.shape().iter().product::<usize>())
            .sum::<usize>()
    };

    // Both adapters active together reproduce the run's held-out score.
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["adapters"], json!(["lora", "prefix"]));
    let trainable = numel("lora") + numel("prefix");
    assert_eq!(results["trainable_params"], json!(trainable));
    assert!(
        stdout.contains(&format!("trainable params: {}", thousands(trainable))),
        "{stdout}"
    );
    let accuracy = results["test"]["accuracy"].as_f64().unwrap();
    let best = root.join("best");
    let eval = burn_peft()
        .args(["eval", "--max-length", "16", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(format!("lora={}", best.join("lora").display()))
        .arg("--adapter")
        .arg(format!("prefix={}", best.join("prefix").display()))
        .arg("--data")
        .arg(tmp.path().join("test.jsonl"))
        .output()
        .unwrap();
    assert!(eval.status.success(), "{}", text(&eval));
    let stdout = String::from_utf8_lossy(&eval.stdout);
    assert!(
        stdout.contains(&format!("accuracy {accuracy:.4}")),
        "{stdout} vs {accuracy}"
    );
}

#[test]
fn a_method_list_names_adapters_after_their_type() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_with_tokenizer(tmp.path(), "bert_cls");
    let methods = "method:\n  - peft_type: LORA\n    r: 2\n    target_modules: [query]\n  - peft_type: PREFIX_TUNING\n    num_virtual_tokens: 2";
    let run = run_config(tmp.path(), &model, methods);
    let out = burn_peft().arg("train").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for name in ["lora", "prefix_tuning"] {
        assert!(
            tmp.path()
                .join("out/adapter")
                .join(name)
                .join("adapter_config.json")
                .is_file()
        );
    }
}

fn logits(file: &Path) -> Vec<f32> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor("logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn forward_and_generate_run_a_different_adapter_per_row() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = common::fixtures();
    let model = model_with_tokenizer(tmp.path(), "gpt2");
    let bundles = fixtures.join("mixed/gpt2");
    let adapter = |name: &str| format!("{name}={}", bundles.join(name).display());
    let output = tmp.path().join("out.safetensors");
    let out = burn_peft()
        .args(["forward", "--model"])
        .arg(&model)
        .arg("--inputs")
        .arg(fixtures.join("models/gpt2/inputs.safetensors"))
        .arg("--output")
        .arg(&output)
        .args(["--adapter", &adapter("sql"), "--adapter", &adapter("chat")])
        .args(["--adapter-per-row", "sql,__base__,chat"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let ours = logits(&output);
    let theirs = logits(&bundles.join("expected.safetensors"));
    // Row 0 is unpadded: compare it whole (rows 1-2 hold padding positions).
    let diff = ours[..7 * 128]
        .iter()
        .zip(&theirs[..7 * 128])
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "{diff}");

    let generate = |extra: &[&str]| {
        let out = burn_peft()
            .args(["generate", "--max-new-tokens", "4", "--model"])
            .arg(&model)
            .args(["--adapter", &adapter("sql"), "--adapter", &adapter("chat")])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let (p1, p2) = (sentence(5, 1), sentence(2, 2));
    let batch = generate(&[
        "--prompt",
        &p1,
        "--prompt",
        &p2,
        "--adapter-per-row",
        "chat,sql",
    ]);
    assert_eq!(batch.len(), 2);
    let alone = |name: &str, prompt: &str| {
        let out = burn_peft()
            .args(["generate", "--max-new-tokens", "4", "--model"])
            .arg(&model)
            .args(["--adapter", &adapter(name), "--prompt", prompt])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    };
    assert_eq!(batch[0], alone("chat", &p1));
    assert_eq!(batch[1], alone("sql", &p2));

    // Names that were not loaded, or one name too few, are exit code 2.
    let bad = burn_peft()
        .args(["generate", "--model"])
        .arg(&model)
        .args([
            "--adapter",
            &adapter("sql"),
            "--prompt",
            &p1,
            "--adapter-per-row",
            "sqll",
        ])
        .output()
        .unwrap();
    common::bad_input(
        &bad,
        &["--adapter-per-row", "no adapter `sqll`", "loaded: sql"],
    );
    let bad = burn_peft()
        .args(["generate", "--model"])
        .arg(&model)
        .args([
            "--adapter",
            &adapter("sql"),
            "--prompt",
            &p1,
            "--prompt",
            &p2,
        ])
        .args(["--adapter-per-row", "sql"])
        .output()
        .unwrap();
    common::bad_input(
        &bad,
        &["--adapter-per-row names 1 adapters for 2 --prompt values"],
    );
}
