//! `burn-peft train / eval / inspect / generate` end to end on the real all-MiniLM-L6-v2 (from
//! the Hugging Face cache, laid there by `scripts/fetch-minilm.sh`; `HF_HUB_OFFLINE=1`) with a
//! slice of the shipped demo data, and bad input on every subcommand: exit code 2 and a message
//! that says what is wrong.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MINILM: &str = "sentence-transformers/all-MiniLM-L6-v2";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn burn_peft() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_burn-peft"));
    c.env("HF_HUB_OFFLINE", "1");
    c
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The first `n` lines of a demo split, copied into `dir`.
fn slice(dir: &Path, split: &str, n: usize) -> PathBuf {
    let all = std::fs::read_to_string(repo().join("examples/data").join(split)).unwrap();
    let lines: Vec<&str> = all.lines().take(n).collect();
    let file = dir.join(split);
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    file
}

fn write_config(dir: &Path, method: &str, extra_train: &str) -> PathBuf {
    slice(dir, "train.jsonl", 96);
    slice(dir, "eval.jsonl", 24);
    slice(dir, "test.jsonl", 24);
    let yaml = format!(
        "model:\n  name_or_path: {MINILM}\n  task: classification\n  num_labels: 8\n{method}\ndata:\n  train: train.jsonl\n  eval: eval.jsonl\n  test: test.jsonl\n  max_length: 32\ntrain:\n  epochs: 1\n  max_steps: 3\n  batch_size: 8\n  learning_rate: 1.0e-3\n  progress: false\n{extra_train}output: out\n"
    );
    let file = dir.join("run.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

const LORA: &str = "method:\n  peft_type: LORA\n  r: 4\n  lora_alpha: 8\n  target_modules: [query, value]\n  modules_to_save: [classifier]";

fn bad_input(out: &Output, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(2), "{}", text(out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "missing `{needle}` in:\n{}",
            text(out)
        );
    }
}

#[test]
fn train_eval_inspect_on_minilm() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), LORA, "");
    let out = burn_peft().arg("train").arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("held-out test (24 examples"), "{stdout}");
    assert!(stdout.contains("trainable params: "), "{stdout}");
    let run = dir.path().join("out");
    for file in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/label_map.json",
        "best/adapter_model.safetensors",
        "label_map.json",
        "results.json",
    ] {
        assert!(run.join(file).is_file(), "missing {file}");
    }
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["steps"], 3);
    assert_eq!(results["method"], "LORA");
    let accuracy = results["test"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy));

    // `eval` with the best adapter reproduces the held-out number the run printed.
    let out = burn_peft()
        .args(["eval", "--model", MINILM, "--max-length", "32", "--adapter"])
        .arg(run.join("best"))
        .arg("--data")
        .arg(dir.path().join("test.jsonl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(&format!("accuracy {accuracy:.4}")),
        "eval printed {printed}, train reported {accuracy}"
    );

    // `inspect` describes the bundle and validates it against the base model.
    let out = burn_peft()
        .arg("inspect")
        .arg(run.join("adapter"))
        .args(["--model", MINILM])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "LORA",
        "r=4 on 12 module(s)",
        "query",
        "value",
        "classifier",
        "every tensor of the bundle fits",
    ] {
        assert!(printed.contains(needle), "missing `{needle}`:\n{printed}");
    }
    // Checked against a model whose width differs, the bundle is rejected.
    let other = repo().join("tests/fixtures/models/bert_cls");
    let out = burn_peft()
        .arg("inspect")
        .arg(run.join("adapter"))
        .arg("--model")
        .arg(&other)
        .output()
        .unwrap();
    // (A classification head of another class count starts fresh, as transformers'
    // `ignore_mismatched_sizes`; the adapter's matrices do not fit the narrower layers.)
    bad_input(
        &out,
        &["bert_cls", "query.lora_A.weight", "expected [4, 32]"],
    );

    // Resume from the last checkpoint: nothing left to do, same adapter.
    let out = burn_peft()
        .arg("train")
        .arg(&config)
        .args(["--resume", "latest"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn full_fine_tuning_saves_a_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "method: full", "");
    let out = burn_peft()
        .arg("train")
        .arg(&config)
        .args(["--max-steps", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let model = dir.path().join("out/model");
    assert!(model.join("model.safetensors").is_file());
    assert!(model.join("tokenizer.json").is_file());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
    assert_eq!(cfg["id2label"].as_object().unwrap().len(), 8);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("trainable params: 22,"), "{stdout}");
}

#[test]
fn train_rejects_bad_configs_with_line_and_hint() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), LORA, "");
    let original = std::fs::read_to_string(&config).unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "learning_rate",
            "learnig_rate",
            &["run.yaml:", "did you mean `learning_rate`"],
        ),
        (
            "lora_alpha",
            "lora_alfa",
            &["run.yaml:8", "did you mean `lora_alpha`"],
        ),
        (
            "peft_type: LORA",
            "peft_type: LOHA",
            &["run.yaml:6", "LOHA", "PREFIX_TUNING"],
        ),
        (
            "target_modules: [query, value]",
            "target_modules: [qeury]",
            &["qeury", "query"],
        ),
        (
            "train: train.jsonl",
            "train: missing.jsonl",
            &["missing.jsonl"],
        ),
        (
            "max_length: 32",
            "max_length: 32\n  packing: true",
            &["run.yaml:16", "data.packing", "causal-lm"],
        ),
    ];
    for (from, to, needles) in cases {
        std::fs::write(&config, original.replace(from, to)).unwrap();
        let out = burn_peft().arg("train").arg(&config).output().unwrap();
        bad_input(&out, needles);
    }
    let out = burn_peft()
        .args(["train", "no/such/config.yaml"])
        .output()
        .unwrap();
    bad_input(&out, &["no/such/config.yaml", "cannot read the config"]);
}

#[test]
fn other_subcommands_reject_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    let out = burn_peft().arg("inspect").arg(&missing).output().unwrap();
    bad_input(&out, &["nothing-here"]);
    let out = burn_peft()
        .args(["eval", "--model", MINILM, "--data"])
        .arg(&missing)
        .output()
        .unwrap();
    bad_input(&out, &["nothing-here", "no such file"]);
    // Classification without a label map: where to get one, or the other task.
    let rows = dir.path().join("rows.jsonl");
    std::fs::write(&rows, "{\"text\": \"a\", \"label\": \"x\"}\n").unwrap();
    let out = burn_peft()
        .args(["eval", "--model", MINILM, "--data"])
        .arg(&rows)
        .output()
        .unwrap();
    bad_input(&out, &["no label map", "--labels", "--task causal-lm"]);
    let labels = dir.path().join("label_map.json");
    std::fs::write(&labels, r#"{"id2label": {"0": "a", "1": "b"}}"#).unwrap();
    let out = burn_peft()
        .args(["eval", "--model", MINILM, "--labels"])
        .arg(&labels)
        .arg("--data")
        .arg(&missing)
        .output()
        .unwrap();
    bad_input(&out, &["nothing-here"]);
    // Generation needs a causal LM; MiniLM is an encoder.
    let out = burn_peft()
        .args(["generate", "--model", MINILM, "--prompt", "hello"])
        .output()
        .unwrap();
    bad_input(&out, &["causal"]);
    let out = burn_peft()
        .args([
            "generate", "--model", MINILM, "--prompt", "x", "--top-p", "2",
        ])
        .output()
        .unwrap();
    bad_input(&out, &["(0, 1]"]);
}
