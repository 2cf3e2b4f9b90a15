//! SGM / LDM kohya names (`lora_unet_input_blocks_...`) against diffusers:
//! tests/fixtures/kohya/sgm_names.json (written by tests/fixtures/gen/sgm_names.py) holds, for
//! two UNet layouts, names and the module paths diffusers' `_maybe_map_sgm_blocks_to_diffusers`
//! and `_convert_non_diffusers_lora_to_diffusers` give them; sgm_a / sgm_b.safetensors are
//! tests/fixtures/sd_fuse's a / b.safetensors with SGM UNet names.

use std::path::{Path, PathBuf};

use peft_lora::kohya::{FuseError, LoraFile, UnetConfig, fuse, sgm_to_diffusers};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn sgm_names_map_as_diffusers_maps_them() {
    let text = std::fs::read_to_string(fixtures().join("kohya/sgm_names.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = json["cases"].as_array().unwrap();
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut wrong = Vec::new();
    for case in cases {
        let config = &json["configs"][case["config"].as_str().unwrap()];
        let config = UnetConfig::from_json(&config.to_string()).unwrap();
        let name = case["kohya"].as_str().unwrap();
        let want = case["diffusers"].as_str().unwrap();
        let ours = sgm_to_diffusers(name, &config);
        if ours.as_deref() != Some(want) {
            wrong.push(format!("{name}: ours {ours:?}, diffusers {want}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_fixture_unet_config_is_read() {
    let config =
        UnetConfig::read(fixtures().join("sd_fuse/model/unet/config.json")).expect("config");
    assert_eq!(
        config,
        UnetConfig {
            layers_per_block: 1
        }
    );
    assert!(UnetConfig::from_json(r#"{"layers_per_block": [1, 2]}"#).is_err());
    assert!(UnetConfig::from_json("{}").is_err());
}

#[test]
fn sgm_modules_are_unmapped_without_a_config() {
    let lora = LoraFile::read(fixtures().join("kohya/sgm_b.safetensors")).unwrap();
    let unet: Vec<_> = lora
        .modules
        .iter()
        .filter(|m| m.name.starts_with("lora_unet_"))
        .collect();
    assert_eq!(unet.len(), 4);
    assert!(unet.iter().all(|m| m.diffusers_path.is_none()));
    let mapped = lora.with_unet_config(&UnetConfig {
        layers_per_block: 1,
    });
    let conv2 = mapped
        .module("lora_unet_output_blocks_2_0_out_layers_3")
        .unwrap();
    assert_eq!(
        conv2.diffusers_path.as_deref(),
        Some("unet.up_blocks.1.resnets.0.conv2")
    );
    assert!(mapped.modules.iter().all(|m| m.diffusers_path.is_some()));
}

#[test]
fn sgm_named_files_fuse_as_their_diffusers_named_twins() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("sd_fuse/model");
    let plain = tmp.path().join("plain");
    let sgm = tmp.path().join("sgm");
    let files = |a: &str, b: &str| vec![(fixtures().join(a), 0.7), (fixtures().join(b), 0.5)];
    fuse(
        &model,
        &files("sd_fuse/a.safetensors", "sd_fuse/b.safetensors"),
        &plain,
    )
    .unwrap();
    let report = fuse(
        &model,
        &files("kohya/sgm_a.safetensors", "kohya/sgm_b.safetensors"),
        &sgm,
    )
    .unwrap();
    assert_eq!(
        report
            .loras
            .iter()
            .map(|l| (l.fused, l.skipped.len()))
            .collect::<Vec<_>>(),
        [(6, 0), (5, 0)]
    );
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        // Same deltas onto the same weights in the same order: the same bytes.
        assert!(
            std::fs::read(sgm.join(file)).unwrap() == std::fs::read(plain.join(file)).unwrap(),
            "{file}"
        );
    }

    // Without unet/config.json the SGM modules cannot be placed and are skipped.
    let bare = tmp.path().join("bare");
    for f in [
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
    ] {
        std::fs::create_dir_all(bare.join(f).parent().unwrap()).unwrap();
        std::fs::copy(model.join(f), bare.join(f)).unwrap();
    }
    let report = fuse(
        &bare,
        &files("kohya/sgm_a.safetensors", "kohya/sgm_b.safetensors"),
        &tmp.path().join("bare_out"),
    )
    .unwrap();
    assert_eq!(
        report
            .loras
            .iter()
            .map(|l| (l.fused, l.skipped.len()))
            .collect::<Vec<_>>(),
        [(2, 4), (1, 4)]
    );
}

#[test]
fn a_file_mixing_sgm_and_diffusers_block_names_keeps_its_sgm_modules_unmapped() {
    use safetensors::{Dtype, tensor::TensorView};
    // diffusers' `_maybe_map_sgm_blocks_to_diffusers` drops the SGM keys of such a file.
    let zeros = [0u8; 16];
    let view = || TensorView::new(Dtype::F32, vec![2, 2], &zeros).unwrap();
    let mut tensors = Vec::new();
    for module in [
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_down_blocks_0_resnets_0_conv2",
    ] {
        tensors.push((format!("{module}.lora_down.weight"), view()));
        tensors.push((format!("{module}.lora_up.weight"), view()));
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mixed.safetensors");
    safetensors::serialize_to_file(tensors, None, &path).unwrap();
    let lora = LoraFile::read(&path)
        .unwrap()
        .with_unet_config(&UnetConfig {
            layers_per_block: 1,
        });
    let paths: Vec<_> = lora
        .modules
        .iter()
        .map(|m| (m.name.as_str(), m.diffusers_path.as_deref()))
        .collect();
    assert_eq!(
        paths,
        [
            (
                "lora_unet_down_blocks_0_resnets_0_conv2",
                Some("unet.down_blocks.0.resnets.0.conv2")
            ),
            ("lora_unet_input_blocks_1_0_in_layers_2", None),
        ]
    );
}

#[test]
fn a_unet_config_without_layers_per_block_fails_only_files_that_need_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("sd_fuse/model");
    let copy = tmp.path().join("model");
    for f in [
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
    ] {
        std::fs::create_dir_all(copy.join(f).parent().unwrap()).unwrap();
        std::fs::copy(model.join(f), copy.join(f)).unwrap();
    }
    std::fs::write(copy.join("unet/config.json"), "{}").unwrap();
    let plain = [(fixtures().join("sd_fuse/a.safetensors"), 0.7)];
    fuse(&copy, &plain, &tmp.path().join("plain")).unwrap();
    let sgm = [(fixtures().join("kohya/sgm_a.safetensors"), 0.7)];
    let err = fuse(&copy, &sgm, &tmp.path().join("sgm")).unwrap_err();
    assert!(
        matches!(&err, FuseError::CorruptModel { file, .. } if file.ends_with("unet/config.json")),
        "{err}"
    );
    assert!(!tmp.path().join("sgm").exists());
}
