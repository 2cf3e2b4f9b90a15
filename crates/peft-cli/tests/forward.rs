//! `burn-peft forward` end to end: the binary reproduces transformers (+ PEFT) outputs for every
//! family, and rejects bad input with a clear message and exit code 2.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{f32_tensors, fixture_mask};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

fn burn_peft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_burn-peft"))
}

/// Run `forward` and compare every output with `expected` (`prefix`ed keys) on valid tokens.
fn run_and_compare(name: &str, extra: &[&str], expected: &Path, prefix: &str) {
    let out = tempfile::tempdir().unwrap();
    let output = out.path().join("out.safetensors");
    let dir = fixtures().join(name);
    let status = burn_peft()
        .args(["forward", "--model"])
        .arg(&dir)
        .arg("--inputs")
        .arg(dir.join("inputs.safetensors"))
        .arg("--output")
        .arg(&output)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let ours = f32_tensors(&output);
    let theirs = f32_tensors(expected);
    let mask = fixture_mask(name);
    assert!(!ours.is_empty());
    for (key, (values, shape)) in &ours {
        if key == "pooler_output" && !theirs.contains_key(&format!("{prefix}{key}")) {
            continue;
        }
        let (want, want_shape) = &theirs[&format!("{prefix}{key}")];
        assert_eq!(shape, want_shape, "{name}: {key}");
        let per_pos: usize = if shape.len() == 3 {
            shape[2]
        } else {
            usize::MAX
        };
        let diff = values
            .iter()
            .zip(want)
            .enumerate()
            .filter(|(i, _)| shape.len() != 3 || mask.get(i / per_pos).is_none_or(|m| *m == 1))
            .map(|(_, (a, b))| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "{name} {extra:?}: `{key}` differs by {diff}");
    }
}

fn family(name: &str) {
    let dir = fixtures().join(name);
    run_and_compare(name, &[], &dir.join("expected.safetensors"), "");
    let adapter = dir.join("lora");
    let adapter = adapter.to_str().unwrap();
    let lora_expected = dir.join("lora/expected.safetensors");
    run_and_compare(name, &["--adapter", adapter], &lora_expected, "");
    run_and_compare(
        name,
        &["--adapter", adapter, "--merge"],
        &lora_expected,
        "merged_",
    );
}

#[test]
fn forward_bert() {
    family("bert");
}

#[test]
fn forward_bert_classifier() {
    family("bert_cls");
}

#[test]
fn forward_gpt2() {
    family("gpt2");
}

#[test]
fn forward_llama_gqa() {
    family("llama_gqa");
}

#[test]
fn forward_llama_tied() {
    family("llama_tied");
}

#[test]
fn forward_qwen2_and_mistral() {
    family("qwen2");
    family("mistral");
}

#[test]
fn forward_vit_from_pixel_values() {
    family("vit");
    family("vit_cls");
}

#[test]
fn forward_resnet_from_pixel_values() {
    family("resnet_cls");
}

/// An image of the wrong channel count is exit 2 naming `pixel_values` and the channels.
#[test]
fn images_of_the_wrong_channel_count_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let gray = tmp.path().join("gray.safetensors");
    let data: Vec<u8> = vec![0.5f32; 2 * 32 * 32]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 1, 32, 32], &data)
            .unwrap();
    std::fs::write(
        &gray,
        safetensors::serialize([("pixel_values", view)], None).unwrap(),
    )
    .unwrap();
    let model = fixtures().join("resnet_cls");
    let out = tmp.path().join("o.safetensors");
    expect_bad_input(
        &[
            "forward",
            "--model",
            model.to_str().unwrap(),
            "--inputs",
            gray.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        "reads 3 channels",
    );
}

fn expect_bad_input(args: &[&str], needle: &str) {
    let out = burn_peft().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{args:?}: expected `{needle}` in: {stderr}"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("gpt2");
    let model = model.to_str().unwrap();
    let inputs = fixtures().join("gpt2/inputs.safetensors");
    let inputs = inputs.to_str().unwrap();
    let out = tmp.path().join("o.safetensors");
    let out = out.to_str().unwrap();

    // Missing inputs file.
    expect_bad_input(
        &[
            "forward",
            "--model",
            model,
            "--inputs",
            "/nonexistent.safetensors",
            "--output",
            out,
        ],
        "nonexistent.safetensors",
    );
    // input_ids of the wrong dtype.
    let float_inputs = tmp.path().join("float.safetensors");
    let data: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 2], &data).unwrap();
    std::fs::write(
        &float_inputs,
        safetensors::serialize([("input_ids", view)], None).unwrap(),
    )
    .unwrap();
    expect_bad_input(
        &[
            "forward",
            "--model",
            model,
            "--inputs",
            float_inputs.to_str().unwrap(),
            "--output",
            out,
        ],
        "expected I64",
    );
    // A model folder that does not exist.
    expect_bad_input(
        &[
            "forward",
            "--model",
            "/no/such/model",
            "--inputs",
            inputs,
            "--output",
            out,
        ],
        "/no/such/model",
    );
    // An unsupported architecture.
    let t5 = tmp.path().join("t5");
    std::fs::create_dir(&t5).unwrap();
    std::fs::write(t5.join("config.json"), r#"{"model_type": "t5"}"#).unwrap();
    std::fs::copy(
        fixtures().join("gpt2/model.safetensors"),
        t5.join("model.safetensors"),
    )
    .unwrap();
    expect_bad_input(
        &[
            "forward",
            "--model",
            t5.to_str().unwrap(),
            "--inputs",
            inputs,
            "--output",
            out,
        ],
        "unsupported architecture `t5`",
    );
    // An adapter for another model.
    let bert_lora = fixtures().join("bert/lora");
    expect_bad_input(
        &[
            "forward",
            "--model",
            model,
            "--adapter",
            bert_lora.to_str().unwrap(),
            "--inputs",
            inputs,
            "--output",
            out,
        ],
        "target_modules",
    );
    assert!(!Path::new(out).exists(), "no output is written on failure");
}

#[test]
fn forward_prefix_bundles_for_gpt2_and_llama_gqa() {
    let prefix = fixtures().join("../prefix");
    for (case, base) in [
        ("gpt2_table", "gpt2"),
        ("gpt2_mlp", "gpt2"),
        ("llama_gqa_table", "llama_gqa"),
        ("llama_gqa_mlp", "llama_gqa"),
    ] {
        let adapter = prefix.join(case);
        run_and_compare(
            base,
            &["--adapter", adapter.to_str().unwrap()],
            &adapter.join("expected.safetensors"),
            "",
        );
    }
}

#[test]
fn forward_refuses_to_merge_a_prefix() {
    let prefix = fixtures().join("../prefix/gpt2_table");
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures().join("gpt2");
    let out = burn_peft()
        .args(["forward", "--model"])
        .arg(&dir)
        .arg("--adapter")
        .arg(&prefix)
        .arg("--merge")
        .arg("--inputs")
        .arg(dir.join("inputs.safetensors"))
        .arg("--output")
        .arg(tmp.path().join("o.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no weight delta to merge"), "{stderr}");
}
