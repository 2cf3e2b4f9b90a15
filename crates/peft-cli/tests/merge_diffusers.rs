//! `burn-peft merge` on a diffusers pipeline folder: kohya LoRA files with weights
//! (`--adapter FILE:WEIGHT`, repeated) fused as diffusers' `set_adapters` + `fuse_lora` does
//! (tests/fixtures/sd_fuse, written by tests/fixtures/gen/sd_fuse.py); and on a single-file
//! checkpoint (original LDM layout), fused as diffusers' `from_single_file` + the same calls do
//! and written back as one file with the same header (tests/fixtures/sd_single_file, written by
//! tests/fixtures/gen/sd_single_file.py).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{bad_input, burn_peft, f32_tensors, fixtures, text};

fn sd_fuse() -> PathBuf {
    fixtures().join("sd_fuse")
}

fn checkpoint() -> PathBuf {
    fixtures().join("sd_single_file/tiny.safetensors")
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

/// The header bytes (size prefix and JSON) and every tensor's bytes, by name.
fn raw(file: &Path) -> (Vec<u8>, HashMap<String, Vec<u8>>) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, v)| (name, v.data().to_vec()))
        .collect();
    (bytes[..8 + n].to_vec(), tensors)
}

/// The fused file against diffusers: the same header bytes (names, order, dtypes, offsets,
/// metadata), the fused tensors within 1e-5, every other tensor byte for byte.
fn check_against_diffusers(out_file: &Path) -> f32 {
    let (header, tensors) = raw(&checkpoint());
    let (our_header, our_tensors) = raw(out_file);
    assert_eq!(our_header, header, "the header changed");
    let want = f32_tensors(&fixtures().join("sd_single_file/expected.safetensors"));
    assert_eq!(want.len(), 10);
    let ours = f32_tensors(out_file);
    let mut worst = 0f32;
    for (name, (values, shape)) in &want {
        let (our_values, our_shape) = &ours[name];
        assert_eq!(our_shape, shape, "{name}");
        let d = our_values
            .iter()
            .zip(values)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-5, "`{name}` differs from diffusers by {d}");
        assert_ne!(our_tensors[name], tensors[name], "`{name}` was not fused");
        worst = worst.max(d);
    }
    for (name, bytes) in &tensors {
        if !want.contains_key(name) {
            assert_eq!(&our_tensors[name], bytes, "`{name}` changed");
        }
    }
    worst
}

#[test]
fn fuses_weighted_kohya_files_into_a_single_file_like_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("fused.safetensors");
    // sgm_a names its UNet modules `lora_unet_input_blocks_1_1_...`: placed with the
    // `layers_per_block` the checkpoint's own blocks imply.
    let out = merge(
        &checkpoint(),
        &[
            lora("../kohya/sgm_a.safetensors", ":0.7"),
            lora("b.safetensors", ":0.5"),
        ],
        &out_file,
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "fused 2 LoRA file(s) into single-file checkpoint",
        "(weight 0.7): 6 module(s)",
        "(weight 0.5): 5 module(s)",
        "unet (7 weight(s) fused, F32)",
        "text_encoder (3 weight(s) fused, F32)",
    ] {
        assert!(stdout.contains(needle), "missing `{needle}` in:\n{stdout}");
    }
    let worst = check_against_diffusers(&out_file);
    println!("max |ours - diffusers| over the fused tensors: {worst:e}");

    // The same LoRA under diffusers block names, over the previous output (replaced whole;
    // nothing left beside it).
    let out = merge(
        &checkpoint(),
        &[lora("a.safetensors", ":0.7"), lora("b.safetensors", ":0.5")],
        &out_file,
    );
    assert!(out.status.success(), "{}", text(&out));
    check_against_diffusers(&out_file);
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["fused.safetensors"]);
}

#[test]
fn bad_inputs_exit_2_naming_the_file_and_module() {
    let tmp = tempfile::tempdir().unwrap();
    let out_file = tmp.path().join("fused.safetensors");
    // A LoRA for a block the checkpoint lacks (down_blocks.3).
    let out = merge(
        &checkpoint(),
        &[
            lora("a.safetensors", ""),
            lora("nomatch.safetensors", ":0.5"),
        ],
        &out_file,
    );
    bad_input(
        &out,
        &[
            "nomatch.safetensors",
            "matches a weight of the model",
            "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn1_to_q",
        ],
    );
    // A delta whose shape does not fit names file, module, tensor and both shapes.
    let out = merge(
        &checkpoint(),
        &[lora("wrong_shape.safetensors", "")],
        &out_file,
    );
    bad_input(
        &out,
        &[
            "wrong_shape.safetensors",
            "attn1_to_q",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            "[8, 8]",
            "[8, 16]",
        ],
    );
    // A .safetensors file that is not a single-file checkpoint (a diffusers UNet file).
    let unet = fixtures().join("sd_fuse/model/unet/diffusion_pytorch_model.safetensors");
    let out = merge(&unet, &[lora("a.safetensors", "")], &out_file);
    bad_input(
        &out,
        &[
            "diffusion_pytorch_model.safetensors",
            "not a single-file Stable Diffusion checkpoint",
        ],
    );
    // Not over the checkpoint itself, not into a folder.
    let out = merge(&checkpoint(), &[lora("a.safetensors", "")], &checkpoint());
    bad_input(&out, &["may not be the model"]);
    let out = merge(&checkpoint(), &[lora("a.safetensors", "")], tmp.path());
    bad_input(&out, &["is a folder"]);
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}
