//! `burn-peft merge` end to end: the merged folder, run alone, reproduces base + adapter (ours
//! and transformers + PEFT's), names the right transformers class, and bad input is a clear error
//! with exit code 2.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{f32_tensors, fixture_mask};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

fn burn_peft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_burn-peft"))
}

type Tensors = HashMap<String, (Vec<f32>, Vec<usize>)>;

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn merge(model: &Path, adapter: &Path, output: &Path, extra: &[&str]) -> Output {
    burn_peft()
        .args(["merge", "--model"])
        .arg(model)
        .arg("--adapter")
        .arg(adapter)
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .unwrap()
}

/// `forward` on the fixture's inputs; `--model` and any extra arguments as given.
fn forward(name: &str, model: &Path, extra: &[&str], out: &Path) -> Tensors {
    let inputs = fixtures().join(name).join("inputs.safetensors");
    let result = burn_peft()
        .args(["forward", "--model"])
        .arg(model)
        .arg("--inputs")
        .arg(&inputs)
        .arg("--output")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    check(&result, &format!("{name}: forward {extra:?}"));
    f32_tensors(out)
}

/// Max |a - b| over the valid positions (every element of pooled outputs).
fn max_diff(
    name: &str,
    key: &str,
    ours: &(Vec<f32>, Vec<usize>),
    theirs: &(Vec<f32>, Vec<usize>),
) -> f32 {
    let ((values, shape), (want, want_shape)) = (ours, theirs);
    assert_eq!(shape, want_shape, "{name}: {key}");
    let mask = fixture_mask(name);
    let per_pos = if shape.len() == 3 {
        shape[2]
    } else {
        usize::MAX
    };
    values
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(i, _)| shape.len() != 3 || mask[i / per_pos] == 1)
        .map(|(_, (a, b))| (a - b).abs())
        .fold(0.0f32, f32::max)
}

fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// Merge the fixture's LoRA bundle, then check the merged folder alone against base + adapter
/// (our forward) and against transformers + PEFT (`lora/expected.safetensors`).
fn merge_family(name: &str, architecture: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join(name);
    let adapter = base.join("lora");
    let merged = tmp.path().join("merged");
    let out = merge(&base, &adapter, &merged, &[]);
    check(&out, &format!("{name}: merge"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("model.safetensors"), "{stdout}");
    assert!(stdout.contains("config.json"), "{stdout}");
    assert!(stdout.contains(architecture), "{stdout}");

    let cfg = config(&merged);
    assert_eq!(
        cfg["architectures"],
        serde_json::json!([architecture]),
        "{name}"
    );
    let source = config(&base);
    assert_eq!(cfg["model_type"], source["model_type"], "{name}");
    let generation = base.join("generation_config.json").is_file();
    assert_eq!(merged.join("generation_config.json").is_file(), generation);

    let with_adapter = forward(
        name,
        &base,
        &["--adapter", adapter.to_str().unwrap()],
        &tmp.path().join("adapter.safetensors"),
    );
    let alone = forward(name, &merged, &[], &tmp.path().join("merged.safetensors"));
    let expected = f32_tensors(&adapter.join("expected.safetensors"));
    assert!(!alone.is_empty());
    for (key, values) in &alone {
        if key == "pooler_output" && !expected.contains_key(key) {
            continue;
        }
        let d = max_diff(name, key, values, &with_adapter[key]);
        assert!(d < 1e-4, "{name}: `{key}` merged vs adapter differs by {d}");
        let d = max_diff(name, key, values, &expected[key]);
        assert!(
            d < 1e-4,
            "{name}: `{key}` merged vs transformers + PEFT differs by {d}"
        );
    }
}

#[test]
fn merge_bert_encoder() {
    merge_family("bert", "BertModel");
}

#[test]
fn merge_bert_classifier() {
    merge_family("bert_cls", "BertForSequenceClassification");
}

#[test]
fn merge_gpt2() {
    merge_family("gpt2", "GPT2LMHeadModel");
}

#[test]
fn merge_llama_gqa_and_tied() {
    merge_family("llama_gqa", "LlamaForCausalLM");
    merge_family("llama_tied", "LlamaForCausalLM");
}

#[test]
fn merge_llama_classifier_and_qwen2() {
    merge_family("llama_cls", "LlamaForSequenceClassification");
    merge_family("qwen2", "Qwen2ForCausalLM");
}

/// Copy a bundle folder (flat) to `to`.
fn copy_bundle(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

#[test]
fn label_names_come_from_label_map_and_output_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("bert_cls");
    let adapter = tmp.path().join("adapter");
    copy_bundle(&base.join("lora"), &adapter);
    std::fs::write(
        adapter.join("label_map.json"),
        r#"{"id2label": {"0": "admin", "1": "games", "2": "web"}, "label2id": {"admin": 0, "games": 1, "web": 2}}"#,
    )
    .unwrap();
    let merged = tmp.path().join("merged");
    check(&merge(&base, &adapter, &merged, &[]), "first merge");
    std::fs::write(merged.join("stale.txt"), "from the previous model").unwrap();
    // A second merge replaces the previous model folder as a whole.
    check(&merge(&base, &adapter, &merged, &[]), "second merge");
    assert!(!merged.join("stale.txt").exists());
    let cfg = config(&merged);
    assert_eq!(
        cfg["id2label"],
        serde_json::json!({"0": "admin", "1": "games", "2": "web"})
    );
    assert_eq!(cfg["label2id"]["web"], 2);
    assert_eq!(cfg["num_labels"], 3);
    // --num-labels that disagrees with label_map.json is refused.
    expect_bad_input(
        &merge(
            &base,
            &adapter,
            &tmp.path().join("m2"),
            &["--num-labels", "4"],
        ),
        "disagrees",
    );
    assert!(!tmp.path().join("m2").exists());
}

fn expect_bad_input(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let gpt2 = fixtures().join("gpt2");
    let output = tmp.path().join("merged");

    // A missing adapter folder.
    let missing = tmp.path().join("no-such-adapter");
    expect_bad_input(&merge(&gpt2, &missing, &output, &[]), "no-such-adapter");

    // Prefix tuning has no weight delta: refused before the model loads.
    let prefix = fixtures().join("../prefix/gpt2_table");
    let out = merge(&gpt2, &prefix, &output, &[]);
    expect_bad_input(&out, "no weight delta to merge");
    expect_bad_input(&out, "PREFIX_TUNING");

    // An adapter for another model.
    let bert_lora = fixtures().join("bert/lora");
    expect_bad_input(&merge(&gpt2, &bert_lora, &output, &[]), "target_modules");

    // SEQ_CLS without label_map.json, saved head or classifier base: asks for --num-labels.
    let bert = fixtures().join("bert");
    let adapter = tmp.path().join("seq_cls");
    copy_bundle(&bert.join("lora"), &adapter);
    let mut cfg = config_of_bundle(&adapter);
    cfg["task_type"] = "SEQ_CLS".into();
    std::fs::write(
        adapter.join("adapter_config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    expect_bad_input(&merge(&bert, &adapter, &output, &[]), "--num-labels");

    // An output folder that holds something other than a model is not replaced.
    let docs = tmp.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    std::fs::write(docs.join("notes.txt"), "keep me").unwrap();
    expect_bad_input(
        &merge(&gpt2, &gpt2.join("lora"), &docs, &[]),
        "does not hold a model",
    );
    assert_eq!(
        std::fs::read_to_string(docs.join("notes.txt")).unwrap(),
        "keep me"
    );
    assert!(!output.exists(), "nothing is written on failure");
}

fn config_of_bundle(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
        .unwrap()
}
