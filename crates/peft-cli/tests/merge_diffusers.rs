//! `burn-peft merge` on a diffusers pipeline folder: kohya LoRA files with weights
//! (`--adapter FILE:WEIGHT`, repeated) fused as diffusers' `set_adapters` + `fuse_lora` does
//! (tests/fixtures/sd_fuse, written by tests/fixtures/gen/sd_fuse.py).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{bad_input, burn_peft, f32_tensors, fixtures, text};

fn sd_fuse() -> PathBuf {
    fixtures().join("sd_fuse")
}

fn merge(model: &Path, adapters: &[String], output: &Path) -> Output {
    let mut cmd = burn_peft();
    cmd.args(["merge", "--model"]).arg(model);
    for a in adapters {
        cmd.arg("--adapter").arg(a);
    }
    cmd.arg("--output").arg(output).output().unwrap()
}

fn lora(name: &str, weight: &str) -> String {
    let file = sd_fuse().join(name);
    format!("{}{weight}", file.display())
}

#[test]
fn fuses_weighted_kohya_files_like_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("fused");
    let out = merge(
        &sd_fuse().join("model"),
        &[lora("a.safetensors", ":0.7"), lora("b.safetensors", ":0.5")],
        &out_dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "fused 2 LoRA file(s)",
        "(weight 0.7): 6 module(s)",
        "(weight 0.5): 5 module(s)",
        "diffusion_pytorch_model.safetensors (7 weight(s) fused, F32)",
        "model.safetensors (3 weight(s) fused, F32)",
    ] {
        assert!(stdout.contains(needle), "missing `{needle}` in:\n{stdout}");
    }
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let ours = f32_tensors(&out_dir.join(file));
        let want = f32_tensors(&sd_fuse().join("expected").join(file));
        assert_eq!(ours.len(), want.len(), "{file}");
        for (name, (values, shape)) in &want {
            let (our_values, our_shape) = &ours[name];
            assert_eq!(our_shape, shape, "{file}: {name}");
            let d = our_values
                .iter()
                .zip(values)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-5, "{file}: `{name}` differs from diffusers by {d}");
        }
    }
    assert!(out_dir.join("model_index.json").is_file());
}

#[test]
fn a_lora_that_matches_nothing_exits_2_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("fused");
    let out = merge(
        &sd_fuse().join("model"),
        &[
            lora("a.safetensors", ""),
            lora("nomatch.safetensors", ":0.5"),
        ],
        &out_dir,
    );
    bad_input(
        &out,
        &["nomatch.safetensors", "matches a weight of the model"],
    );
    assert!(!out_dir.exists());
    // A shape that does not fit names file, module and both shapes.
    let out = merge(
        &sd_fuse().join("model"),
        &[lora("wrong_shape.safetensors", "")],
        &out_dir,
    );
    bad_input(
        &out,
        &["wrong_shape.safetensors", "attn1_to_q", "[8, 8]", "[8, 16]"],
    );
    // A suffix that is not a number is part of the file name: no such file.
    let out = merge(
        &sd_fuse().join("model"),
        &[lora("a.safetensors", ":heavy")],
        &out_dir,
    );
    bad_input(&out, &["a.safetensors:heavy"]);
    assert!(!out_dir.exists());
}

#[test]
fn several_adapters_for_a_peft_model_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let gpt2 = fixtures().join("models/gpt2");
    let adapter = gpt2.join("lora").display().to_string();
    let out = merge(
        &gpt2,
        &[adapter.clone(), adapter],
        &tmp.path().join("merged"),
    );
    bad_input(&out, &["--adapter is given 2 times", "burn-peft combine"]);
}
