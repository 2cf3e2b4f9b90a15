//! `burn-peft` on the Vulkan device (lavapipe in CI): `devices`, `train` for a few steps with
//! `device: vulkan` on a tiny Llama (GQA) fixture, `eval` and `forward` with `--device vulkan`,
//! and a half precision the device lacks refused with exit code 2.
//!
//! Without a Vulkan backend (`--features wgpu`, or `vulkan` on a GPU with explicit workgroup
//! layouts) the tests are ignored (the test count says they did not run); with one but without
//! a Vulkan adapter they print `SKIPPED ...` and pass, unless `BURN_PEFT_REQUIRE_VULKAN` is set
//! (`.ci/run` sets it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[cfg(not(any(feature = "vulkan", feature = "wgpu")))]
#[path = "../../../tests/common/gpu_tests.rs"]
mod gpu_tests;

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

/// Whether the Vulkan tests can run here; prints why not (or panics when they must).
fn vulkan_ready(what: &str) -> bool {
    match peft_train::device::open("vulkan") {
        Ok(_) => true,
        Err(e) if std::env::var_os("BURN_PEFT_REQUIRE_VULKAN").is_some() => {
            panic!("{what}: BURN_PEFT_REQUIRE_VULKAN is set but the Vulkan device is unusable: {e}")
        }
        Err(e) => {
            // Straight to stderr: the test harness captures `eprintln!` of passing tests.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {what}: {e} (set BURN_PEFT_REQUIRE_VULKAN=1 to make this a failure)"
            );
            false
        }
    }
}

/// The tiny Llama (GQA) fixture with a word-level tokenizer over its 128 ids (`w2` .. `w127`;
/// 0 is padding, 1 unknown), in a folder of its own.
fn tiny_llama(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-llama");
    std::fs::create_dir_all(&model).unwrap();
    let fixture = repo().join("tests/fixtures/models/llama_gqa");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), model.join(file)).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    vocab.insert("<pad>".into(), 0.into());
    vocab.insert("<unk>".into(), 1.into());
    for i in 2..128 {
        vocab.insert(format!("w{i}"), i.into());
    }
    let special = |id: u32, t: &str| {
        serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<pad>"), special(1, "<unk>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    model
}

/// Sixteen short "sentences" of four repeating patterns.
fn lm_data(dir: &Path) -> PathBuf {
    let lines: Vec<String> = (0..16)
        .map(|i| {
            let start = 2 + (i % 4) * 25;
            let words: Vec<String> = (0..10).map(|k| format!("w{}", start + 2 * k)).collect();
            serde_json::json!({"text": words.join(" ")}).to_string()
        })
        .collect();
    let file = dir.join("train.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    file
}

#[test]
#[cfg_attr(
    not(any(feature = "vulkan", feature = "wgpu")),
    ignore = "needs a GPU build (--features wgpu or vulkan)"
)]
fn devices_lists_the_vulkan_adapter() {
    if !vulkan_ready("burn-peft devices") {
        return;
    }
    let out = burn_peft().arg("devices").output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("vulkan:0 "), "{stdout}");
    assert!(stdout.contains("f16: "), "{stdout}");
}

#[test]
#[cfg_attr(
    not(any(feature = "vulkan", feature = "wgpu")),
    ignore = "needs a GPU build (--features wgpu or vulkan)"
)]
fn train_eval_forward_on_vulkan() {
    if !vulkan_ready("burn-peft train with device: vulkan") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_llama(dir.path());
    lm_data(dir.path());
    let yaml = format!(
        "model:\n  name_or_path: {}\n  task: causal-lm\nmethod:\n  peft_type: LORA\n  r: 4\n  lora_alpha: 8\n  lora_dropout: 0.1\n  target_modules: [q_proj, v_proj]\ndata:\n  train: train.jsonl\n  eval: train.jsonl\n  max_length: 16\ntrain:\n  epochs: 1\n  max_steps: 4\n  batch_size: 4\n  learning_rate: 1.0e-2\n  save_every: 2\n  progress: false\noutput: out\ndevice: vulkan\n",
        model.display()
    );
    let config = dir.path().join("run.yaml");
    std::fs::write(&config, yaml).unwrap();
    let out = burn_peft().arg("train").arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("device: vulkan:0 "), "{stdout}");
    let run = dir.path().join("out");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["steps"], 4, "{results}");
    assert!(results["eval"]["loss"].as_f64().unwrap().is_finite());
    assert!(run.join("adapter/adapter_model.safetensors").is_file());
    let latest = peft_train::checkpoint::latest(&run.join("checkpoints")).expect("a checkpoint");
    assert!(latest.ends_with("step-00000004"), "{}", latest.display());

    // `eval` of the trained adapter on Vulkan and on flex agree.
    let eval = |device: &str| {
        let out = burn_peft()
            .args(["eval", "--task", "causal-lm", "--device", device, "--model"])
            .arg(&model)
            .arg("--adapter")
            .arg(run.join("adapter"))
            .arg("--data")
            .arg(dir.path().join("train.jsonl"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let loss: f64 = stdout
            .rsplit("loss ")
            .next()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no loss in {stdout}"));
        loss
    };
    let (on_vulkan, on_flex) = (eval("vulkan"), eval("flex"));
    assert!(
        (on_vulkan - on_flex).abs() < 1e-3,
        "eval loss {on_vulkan} on Vulkan, {on_flex} on flex"
    );

    // `forward --device vulkan` matches transformers on the fixture inputs.
    let fixture = repo().join("tests/fixtures/models/llama_gqa");
    let written = dir.path().join("logits.safetensors");
    let out = burn_peft()
        .args(["forward", "--device", "vulkan", "--model"])
        .arg(&fixture)
        .arg("--inputs")
        .arg(fixture.join("inputs.safetensors"))
        .arg("--output")
        .arg(&written)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let read = |file: &Path| -> Vec<f32> {
        let bytes = std::fs::read(file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("logits")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let (ours, theirs) = (read(&written), read(&fixture.join("expected.safetensors")));
    let mask: Vec<i64> = {
        let bytes = std::fs::read(fixture.join("inputs.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("attention_mask")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let per_token = ours.len() / mask.len();
    let diff = ours
        .iter()
        .zip(&theirs)
        .enumerate()
        .filter(|(i, _)| mask[i / per_token] == 1)
        .map(|(_, (a, b))| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        diff < 1e-4,
        "forward on Vulkan differs from transformers by {diff}"
    );
}

#[test]
#[cfg_attr(
    not(any(feature = "vulkan", feature = "wgpu")),
    ignore = "needs a GPU build (--features wgpu or vulkan)"
)]
fn unsupported_half_precision_on_vulkan_exits_2() {
    if !vulkan_ready("--dtype on Vulkan") {
        return;
    }
    let device = peft_train::device::open("vulkan").unwrap();
    let Some(missing) = ["bf16", "f16"].into_iter().find(|d| {
        let dtype: peft_core::precision::BaseDType = d.parse().unwrap();
        !device.supports_dtype(dtype.float_dtype())
    }) else {
        eprintln!("this Vulkan device computes in f16 and bf16; nothing to refuse");
        return;
    };
    let fixture = repo().join("tests/fixtures/models/llama_gqa");
    let dir = tempfile::tempdir().unwrap();
    let out = burn_peft()
        .args([
            "forward", "--device", "vulkan", "--dtype", missing, "--model",
        ])
        .arg(&fixture)
        .arg("--inputs")
        .arg(fixture.join("inputs.safetensors"))
        .arg("--output")
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot compute in {missing}")),
        "{stderr}"
    );
}

#[test]
#[cfg_attr(
    not(any(feature = "vulkan", feature = "wgpu")),
    ignore = "needs a GPU build (--features wgpu or vulkan)"
)]
fn a_vulkan_adapter_that_does_not_exist_lists_the_ones_there_are() {
    if !vulkan_ready("vulkan:N past the end") {
        return;
    }
    let fixture = repo().join("tests/fixtures/models/llama_gqa");
    let dir = tempfile::tempdir().unwrap();
    let out = burn_peft()
        .args(["forward", "--device", "vulkan:99", "--model"])
        .arg(&fixture)
        .arg("--inputs")
        .arg(fixture.join("inputs.safetensors"))
        .arg("--output")
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no Vulkan adapter 99") && stderr.contains("vulkan:0 "),
        "{stderr}"
    );
}

/// Tests of this file that need no GPU and run in every build.
const RUNS_ANYWHERE: &[&str] = &[];

/// Built without a GPU feature the tests above cannot run (there is no Vulkan device to
/// open): they are ignored there, so the test count says what ran. They used to print
/// `SKIPPED` and count as passed.
#[cfg(not(any(feature = "vulkan", feature = "wgpu")))]
#[test]
fn without_a_gpu_feature_the_gpu_tests_are_ignored() {
    gpu_tests::assert_gpu_tests_ignored(RUNS_ANYWHERE);
}
