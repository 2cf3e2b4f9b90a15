//! `burn-peft export --format gguf` checked with llama.cpp itself. A PEFT LoRA made on the real
//! SmolLM2-135M-Instruct GGUF (`tests/fixtures/gen/smollm2_lora.py bundle`) is exported here as
//! llama.cpp's LoRA GGUF, the base as F16 and the merged model as F16; llama.cpp's logits for
//! exactly those files (their sha256 are recorded) are committed by the generator's `llamacpp`
//! step (PyPI `llama-cpp-python`, llama.cpp built from source). Our logits must match them.
//! Also: `merge` of a GGUF base writes a folder with the tokenizer from the GGUF metadata, and
//! what llama.cpp adapters cannot carry is refused with exit code 2.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bad_input, burn_peft, f32_tensors, fixtures, smollm2, text};

fn gguf_fixture(name: &str) -> PathBuf {
    fixtures().join("gguf").join(name)
}

/// The float32 tensors of a safetensors file, by name (values only).
fn floats(file: &Path) -> HashMap<String, Vec<f32>> {
    f32_tensors(file)
        .into_iter()
        .map(|(name, (values, _))| (name, values))
        .collect()
}

fn sha256(file: &Path) -> String {
    let out = Command::new("sha256sum").arg(file).output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn run(args: &[&str]) {
    let out = burn_peft().args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", text(&out));
}

/// `burn-peft forward` of `ids` with `extra` arguments: the last position's logits.
fn last_logits(model: &Path, ids: &[i64], extra: &[&str], tmp: &Path) -> Vec<f32> {
    let inputs = tmp.join("ids.safetensors");
    let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, ids.len()], &bytes)
            .unwrap();
    safetensors::serialize_to_file([("input_ids", view)], None, &inputs).unwrap();
    let out = tmp.join("logits.safetensors");
    let mut args = vec!["forward", "--model", model.to_str().unwrap()];
    args.extend(["--inputs", inputs.to_str().unwrap()]);
    args.extend(["--output", out.to_str().unwrap()]);
    args.extend(extra);
    run(&args);
    let logits = &floats(&out)["logits"];
    let vocab = logits.len() / ids.len();
    logits[logits.len() - vocab..].to_vec()
}

#[test]
fn exports_run_in_llamacpp_with_our_numbers() {
    let base = smollm2();
    let base_s = base.to_str().unwrap();
    let bundle = gguf_fixture("smollm2_lora");
    let bundle_s = bundle.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = |name: &str| tmp.path().join(name);
    let notes: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(gguf_fixture("smollm2_llamacpp.json")).unwrap(),
    )
    .unwrap();
    let llama = floats(&gguf_fixture("smollm2_llamacpp.safetensors"));

    // The exported files are exactly the ones llama.cpp ran on.
    let lora = out("lora.gguf");
    run(&[
        "export",
        "--format",
        "gguf",
        "--model",
        base_s,
        "--adapter",
        bundle_s,
        "--output",
    ]
    .into_iter()
    .chain([lora.to_str().unwrap()])
    .collect::<Vec<_>>());
    let base_f16 = out("base_f16.gguf");
    run(&[
        "export",
        "--model",
        base_s,
        "--merged",
        "--outtype",
        "f16",
        "--output",
        base_f16.to_str().unwrap(),
    ]);
    let merged = out("merged_f16.gguf");
    run(&[
        "export",
        "--model",
        base_s,
        "--adapter",
        bundle_s,
        "--merged",
        "--outtype",
        "f16",
        "--output",
        merged.to_str().unwrap(),
    ]);
    for (file, key) in [
        (&lora, "adapter_sha256"),
        (&base_f16, "base_f16_sha256"),
        (&merged, "merged_sha256"),
    ] {
        assert_eq!(
            sha256(file),
            notes[key].as_str().unwrap(),
            "{} is not the file llama.cpp ran on; rerun tests/fixtures/gen/smollm2_lora.py llamacpp",
            file.display()
        );
    }

    // Our numbers (GGUF base, PEFT bundle) against llama.cpp's with our exports. With F16 weights
    // llama.cpp computes in float: the measured gap is f16 rounding (about 0.05).
    let ids: Vec<i64> = notes["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let ours_base = last_logits(&base, &ids, &[], tmp.path());
    let ours_lora = last_logits(&base, &ids, &["--adapter", bundle_s], tmp.path());
    let effect = max_diff(&ours_lora, &ours_base);
    assert!(
        effect > 0.3,
        "the adapter barely changes the logits ({effect})"
    );
    for (key, ours, name) in [
        ("f16_base", &ours_base, "base exported as F16"),
        ("f16_lora", &ours_lora, "F16 base + our LoRA GGUF"),
        ("merged", &ours_lora, "our merged F16 export"),
    ] {
        let diff = max_diff(ours, &llama[key]);
        assert!(
            diff < 0.1,
            "llama.cpp with the {name} differs from us by {diff}"
        );
    }
    // On the Q4_1 file llama.cpp quantizes activations to 8 bits (logits move by up to ~1.1,
    // about 0.35 on average here): the same three top tokens, and the average gap.
    let top3 = |v: &[f32]| {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
        let mut top = order[..3].to_vec();
        top.sort();
        top
    };
    for (ours, key) in [(&ours_base, "q4_base"), (&ours_lora, "q4_lora")] {
        assert_eq!(top3(ours), top3(&llama[key]), "{key}");
        let mean = ours
            .iter()
            .zip(&llama[key])
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / ours.len() as f32;
        assert!(mean < 0.5, "{key}: mean gap {mean}");
    }

    // Our loader reads our merged export back: the merged model, through F16.
    let reread = last_logits(&merged, &ids, &[], tmp.path());
    let diff = max_diff(&reread, &ours_lora);
    assert!(
        diff < 0.1,
        "the merged F16 export read back differs by {diff}"
    );
}

#[test]
fn merge_of_a_gguf_base_writes_its_tokenizer() {
    let base = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("merged");
    let out = burn_peft()
        .args(["merge", "--model", base.to_str().unwrap(), "--adapter"])
        .arg(gguf_fixture("smollm2_lora"))
        .arg("--output")
        .arg(&folder)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(folder.join(file).is_file(), "{file} missing");
    }
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(folder.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert!(
        config["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>")
    );
    assert_eq!(config["eos_token"], "<|im_end|>");
    // The merged folder generates as the GGUF base with the adapter does.
    let ids = [1i64, 9690, 198, 2683, 359];
    let a = last_logits(&folder, &ids, &[], tmp.path());
    let bundle = gguf_fixture("smollm2_lora");
    let b = last_logits(
        &base,
        &ids,
        &["--adapter", bundle.to_str().unwrap()],
        tmp.path(),
    );
    let diff = max_diff(&a, &b);
    assert!(diff < 1e-3, "merged folder vs base + adapter: {diff}");
}

#[test]
fn what_llamacpp_adapters_cannot_carry_is_refused() {
    let base = smollm2();
    let tmp = tempfile::tempdir().unwrap();
    // A DoRA bundle.
    let dora = tmp.path().join("dora");
    std::fs::create_dir_all(&dora).unwrap();
    let src = gguf_fixture("smollm2_lora");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        dora.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    config["use_dora"] = true.into();
    std::fs::write(dora.join("adapter_config.json"), config.to_string()).unwrap();
    let out = burn_peft()
        .args(["export", "--model", base.to_str().unwrap(), "--adapter"])
        .arg(&dora)
        .arg("--output")
        .arg(tmp.path().join("x.gguf"))
        .output()
        .unwrap();
    bad_input(&out, &["DoRA", "--merged"]);
    // Not a GGUF base.
    let out = burn_peft()
        .args(["export", "--model"])
        .arg(fixtures().join("models/llama_gqa"))
        .arg("--adapter")
        .arg(&src)
        .arg("--output")
        .arg(tmp.path().join("x.gguf"))
        .output()
        .unwrap();
    bad_input(&out, &["not a .gguf file"]);
    // A format llama.cpp files do not hold.
    let out = burn_peft()
        .args([
            "export",
            "--model",
            base.to_str().unwrap(),
            "--merged",
            "--outtype",
            "nf4",
        ])
        .arg("--output")
        .arg(tmp.path().join("x.gguf"))
        .output()
        .unwrap();
    bad_input(&out, &["NF4"]);
    assert!(!tmp.path().join("x.gguf").exists());
}
