//! `burn-peft inspect` on kohya / diffusers Stable Diffusion LoRA files (tests/fixtures/kohya,
//! written by tests/fixtures/gen/kohya_files.py).

mod common;

use common::{bad_input, burn_peft, fixtures, text};

/// What `inspect FILE` prints (it must succeed).
fn inspect(name: &str) -> String {
    let out = burn_peft()
        .arg("inspect")
        .arg(fixtures().join("kohya").join(name))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

fn assert_lines(printed: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            printed.lines().any(|l| l.trim_end() == *line),
            "missing line {line:?} in\n{printed}"
        );
    }
}

#[test]
fn describes_a_kohya_file() {
    let printed = inspect("sd15_kohya.safetensors");
    assert_lines(
        &printed,
        &[
            "format:   kohya (sd-scripts)",
            "networks: unet (5 module(s)), text_encoder (2 module(s))",
            "modules:  7 (5 linear, 2 conv)",
            "ranks:    r=2 on 1 module(s), r=4 on 5 module(s), r=8 on 1 module(s)",
            "alphas:   1 on 2 module(s), 2 on 1 module(s), 4 on 2 module(s), = rank (none stored) on 2 module(s)",
            "conv:     1x1 on 1 module(s), 3x3 on 1 module(s)",
            "dora:     magnitude vector on 1 module(s)",
        ],
    );
    assert!(!printed.contains("unmapped:"), "{printed}");
    let conv = printed
        .lines()
        .find(|l| l.contains("lora_unet_down_blocks_0_resnets_0_conv1"))
        .unwrap();
    for part in ["conv3x3", "16->16", "r=2", "alpha=1", "scale=0.5"] {
        assert!(conv.contains(part), "{part} in {conv}");
    }
    assert!(
        conv.ends_with("-> unet.down_blocks.0.resnets.0.conv1"),
        "{conv}"
    );
}

#[test]
fn describes_sdxl_and_diffusers_files() {
    assert_lines(
        &inspect("sdxl_kohya.safetensors"),
        &[
            "networks: unet (2 module(s)), text_encoder_1 (1 module(s)), text_encoder_2 (1 module(s))",
            "conv:     none",
            "dora:     none",
        ],
    );
    assert_lines(
        &inspect("diffusers_peft.safetensors"),
        &[
            "format:   diffusers PEFT-style (lora_A / lora_B)",
            "alphas:   2 on 1 module(s), = rank (none stored) on 3 module(s)",
        ],
    );
    assert_lines(
        &inspect("diffusers_old.safetensors"),
        &["format:   diffusers (lora.down / lora.up)"],
    );
}

#[test]
fn broken_files_exit_2_naming_the_file() {
    let out = burn_peft()
        .arg("inspect")
        .arg(fixtures().join("kohya/broken_rank.safetensors"))
        .output()
        .unwrap();
    bad_input(
        &out,
        &[
            "broken_rank.safetensors",
            "down projection has rank 4",
            "up projection has rank 2",
        ],
    );
    // Not a safetensors file at all.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let out = burn_peft().arg("inspect").arg(&junk).output().unwrap();
    bad_input(&out, &["junk.safetensors", "corrupt or truncated"]);
    // `--model` checks PEFT bundle folders only.
    let out = burn_peft()
        .arg("inspect")
        .arg(fixtures().join("kohya/sdxl_kohya.safetensors"))
        .args(["--model", "whatever"])
        .output()
        .unwrap();
    bad_input(&out, &["--model checks PEFT adapter folders"]);
}
