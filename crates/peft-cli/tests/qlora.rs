//! QLoRA: `dtype: nf4` (bitsandbytes' NF4, blocks of 64) or `q8` keeps the frozen base
//! quantized while LoRA trains in f32, and what comes out is an ordinary PEFT bundle. The
//! fixture `tests/fixtures/quant/qlora_llama/` (`tests/fixtures/gen/qlora_llama.py`) holds a
//! bundle trained here on an NF4 base and PEFT's logits with it on the float32 base.

mod common;

use std::path::{Path, PathBuf};

use common::{bad_input, burn_peft, f32_tensors, fixtures, text};

fn qlora() -> PathBuf {
    fixtures().join("quant/qlora_llama")
}

/// `burn-peft forward` of the fixture inputs: the logits at valid positions (row 1 has 5).
fn forward(adapter: &Path, extra: &[&str], tmp: &Path) -> Vec<f32> {
    let out = tmp.join("logits.safetensors");
    let run = burn_peft()
        .arg("forward")
        .arg("--model")
        .arg(qlora().join("model"))
        .arg("--inputs")
        .arg(qlora().join("inputs.safetensors"))
        .arg("--adapter")
        .arg(adapter)
        .arg("--output")
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    valid(&f32_tensors(&out)["logits"].0)
}

fn valid(logits: &[f32]) -> Vec<f32> {
    let per_row = logits.len() / 2;
    let per_pos = per_row / 8;
    let mut out = logits[..per_row].to_vec();
    out.extend_from_slice(&logits[per_row..per_row + 5 * per_pos]);
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A copy of the fixture's run with `dtype` and `method` changed.
fn run_dir(tmp: &Path, dtype: &str, method: &str) -> PathBuf {
    let dir = tmp.join(format!("run-{dtype}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(qlora().join("train.jsonl"), dir.join("train.jsonl")).unwrap();
    let yaml = std::fs::read_to_string(qlora().join("run.yaml"))
        .unwrap()
        .replace(
            "name_or_path: model",
            &format!("name_or_path: {}", qlora().join("model").display()),
        )
        .replace("dtype: nf4", &format!("dtype: {dtype}"))
        .replace(
            "  peft_type: LORA\n  r: 4\n  lora_alpha: 8\n  target_modules: all-linear\n",
            method,
        );
    std::fs::write(dir.join("run.yaml"), yaml).unwrap();
    dir
}

#[test]
fn a_qlora_adapter_gives_peft_numbers_on_the_float_base() {
    let tmp = tempfile::tempdir().unwrap();
    let ours = forward(&qlora().join("adapter"), &[], tmp.path());
    let peft = valid(&f32_tensors(&qlora().join("peft_logits.safetensors"))["logits"].0);
    let diff = max_diff(&ours, &peft);
    assert!(diff < 1e-5, "f32 base + QLoRA adapter vs PEFT: {diff}");
    // On the NF4 base it was trained on: bitsandbytes' NF4 numbers (NF4 moves these logits by
    // up to 3.4, so this also shows the base really is quantized).
    let nf4 = forward(&qlora().join("adapter"), &["--dtype", "nf4"], tmp.path());
    let bnb = valid(&f32_tensors(&qlora().join("peft_logits.safetensors"))["nf4_logits"].0);
    let diff = max_diff(&nf4, &bnb);
    assert!(
        diff < 1e-4,
        "NF4 base + QLoRA adapter vs PEFT on bitsandbytes' NF4: {diff}"
    );
    assert!(max_diff(&nf4, &ours) > 0.1);
}

#[test]
fn nf4_and_q8_runs_write_plain_peft_bundles() {
    let tmp = tempfile::tempdir().unwrap();
    let committed = f32_tensors(&qlora().join("adapter/adapter_model.safetensors"));
    for dtype in ["nf4", "q8"] {
        let dir = run_dir(
            tmp.path(),
            dtype,
            "  peft_type: LORA\n  r: 4\n  lora_alpha: 8\n  target_modules: all-linear\n",
        );
        let out = burn_peft()
            .arg("train")
            .arg(dir.join("run.yaml"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{dtype}: {}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("14 linear layers"), "{dtype}: {stderr}");
        let adapter = dir.join("out/adapter");
        let tensors = f32_tensors(&adapter.join("adapter_model.safetensors"));
        // The same tensors as any LoRA bundle of this model, trained (B moved off zero).
        let mut names: Vec<_> = tensors.keys().collect();
        let mut want: Vec<_> = committed.keys().collect();
        names.sort();
        want.sort();
        assert_eq!(names, want, "{dtype}");
        for (name, (values, shape)) in &tensors {
            assert_eq!(shape, &committed[name].1, "{dtype}: {name}");
            if name.contains("lora_B") {
                assert!(
                    values.iter().any(|v| *v != 0.0),
                    "{dtype}: {name} did not train"
                );
            }
        }
        let config = std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap();
        for word in ["nf4", "\"q8\"", "bnb", "4bit"] {
            assert!(!config.contains(word), "{dtype}: `{word}` in {config}");
        }
        // It loads on the float32 base.
        forward(&adapter, &[], tmp.path());
    }
}

#[test]
fn full_fine_tuning_of_a_quantized_base_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = run_dir(tmp.path(), "nf4", "");
    let yaml = std::fs::read_to_string(dir.join("run.yaml"))
        .unwrap()
        .replace("method:\n", "method: full\n");
    std::fs::write(dir.join("run.yaml"), yaml).unwrap();
    let out = burn_peft()
        .arg("train")
        .arg(dir.join("run.yaml"))
        .output()
        .unwrap();
    bad_input(&out, &["run.yaml", "dtype", "nf4"]);
    assert!(!dir.join("out").exists());
}
