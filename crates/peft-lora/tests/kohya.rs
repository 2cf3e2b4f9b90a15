//! `peft_lora::kohya` on the committed files of tests/fixtures/kohya (written by
//! tests/fixtures/gen/kohya_files.py) and on broken variants built here from them.

use std::path::{Path, PathBuf};

use peft_lora::kohya::{
    KohyaError, LoraFile, LoraFormat, LoraModule, ModuleKind, Network, kohya_to_diffusers,
};
use safetensors::Dtype;
use safetensors::tensor::{SafeTensors, TensorView};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/kohya")
        .join(name)
}

fn module<'a>(file: &'a LoraFile, name: &str) -> &'a LoraModule {
    file.module(name)
        .unwrap_or_else(|| panic!("no module {name} in {:#?}", file.modules))
}

const BLOCK: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0";

#[test]
fn sd15_kohya_file_is_parsed() {
    let file = LoraFile::read(fixture("sd15_kohya.safetensors")).unwrap();
    assert_eq!(file.format, LoraFormat::Kohya);
    assert_eq!(file.modules.len(), 7);
    assert_eq!(file.networks(), [Network::Unet, Network::TextEncoder]);

    let q = module(&file, &format!("{BLOCK}_attn1_to_q"));
    assert_eq!(q.network, Network::Unet);
    assert_eq!(q.kind, ModuleKind::Linear);
    assert_eq!((q.rank, q.in_features, q.out_features), (4, 16, 16));
    // Stored as an F16 0-d tensor.
    assert_eq!((q.alpha, q.alpha_stored), (1.0, true));
    assert!(!q.has_dora_scale);
    assert_eq!(
        q.diffusers_path.as_deref(),
        Some("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    );
    assert_eq!(file.scale(&q.name), Some(0.25));

    // No alpha in the file: alpha = rank, scale 1 (sd-scripts' default).
    let out = module(&file, &format!("{BLOCK}_attn2_to_out_0"));
    assert_eq!((out.alpha, out.alpha_stored), (4.0, false));
    assert_eq!(out.scale(), 1.0);
    assert_eq!(
        out.diffusers_path.as_deref(),
        Some("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0")
    );

    let conv = module(&file, "lora_unet_down_blocks_0_resnets_0_conv1");
    assert_eq!(conv.kind, ModuleKind::Conv { kernel: [3, 3] });
    assert_eq!((conv.rank, conv.alpha, conv.scale()), (2, 1.0, 0.5));
    assert_eq!(
        conv.diffusers_path.as_deref(),
        Some("unet.down_blocks.0.resnets.0.conv1")
    );

    let proj_in = module(&file, "lora_unet_mid_block_attentions_0_proj_in");
    assert_eq!(proj_in.kind, ModuleKind::Conv { kernel: [1, 1] });
    assert_eq!(
        proj_in.diffusers_path.as_deref(),
        Some("unet.mid_block.attentions.0.proj_in")
    );

    let ff = module(
        &file,
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
    );
    assert!(ff.has_dora_scale);
    assert_eq!((ff.rank, ff.in_features, ff.out_features), (8, 16, 32));
    assert_eq!(ff.scale(), 0.5);
    assert_eq!(
        ff.diffusers_path.as_deref(),
        Some("unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj")
    );

    let te = module(
        &file,
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    );
    assert_eq!(te.network, Network::TextEncoder);
    assert_eq!(
        te.diffusers_path.as_deref(),
        Some("text_encoder.text_model.encoder.layers.0.self_attn.q_proj")
    );
    // A stored alpha of 0 means "alpha is rank" (sd-scripts `LoRAModule`).
    let fc1 = module(&file, "lora_te_text_model_encoder_layers_0_mlp_fc1");
    assert_eq!((fc1.alpha, fc1.alpha_stored), (4.0, false));
    assert_eq!(
        fc1.diffusers_path.as_deref(),
        Some("text_encoder.text_model.encoder.layers.0.mlp.fc1")
    );
}

#[test]
fn sdxl_kohya_file_has_both_text_encoders() {
    let file = LoraFile::read(fixture("sdxl_kohya.safetensors")).unwrap();
    assert_eq!(file.format, LoraFormat::Kohya);
    assert_eq!(
        file.networks(),
        [Network::Unet, Network::TextEncoder1, Network::TextEncoder2]
    );
    let k = module(
        &file,
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k",
    );
    // alpha stored with shape [1].
    assert_eq!((k.alpha, k.scale()), (8.0, 2.0));
    let temb = module(&file, "lora_unet_mid_block_resnets_0_time_emb_proj");
    assert_eq!(
        temb.diffusers_path.as_deref(),
        Some("unet.mid_block.resnets.0.time_emb_proj")
    );
    assert_eq!((temb.in_features, temb.out_features), (32, 16));
    let te1 = module(
        &file,
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj",
    );
    assert_eq!(te1.network, Network::TextEncoder1);
    assert_eq!(
        te1.diffusers_path.as_deref(),
        Some("text_encoder.text_model.encoder.layers.0.self_attn.k_proj")
    );
    let te2 = module(
        &file,
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj",
    );
    assert_eq!(te2.network, Network::TextEncoder2);
    assert_eq!(
        te2.diffusers_path.as_deref(),
        Some("text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj")
    );
}

#[test]
fn diffusers_peft_style_file_is_parsed() {
    let file = LoraFile::read(fixture("diffusers_peft.safetensors")).unwrap();
    assert_eq!(file.format, LoraFormat::PeftLike);
    // `text_encoder.` next to `text_encoder_2.` is SDXL's first encoder.
    assert_eq!(
        file.networks(),
        [Network::Unet, Network::TextEncoder1, Network::TextEncoder2]
    );
    let q_name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let q = module(&file, q_name);
    assert_eq!((q.rank, q.alpha, q.alpha_stored), (4, 2.0, true));
    assert_eq!(q.diffusers_path.as_deref(), Some(q_name));
    let shortcut = module(&file, "unet.up_blocks.0.resnets.0.conv_shortcut");
    assert_eq!(shortcut.kind, ModuleKind::Conv { kernel: [1, 1] });
    assert_eq!((shortcut.in_features, shortcut.out_features), (32, 16));
    let v = module(
        &file,
        "text_encoder.text_model.encoder.layers.0.self_attn.v_proj",
    );
    assert_eq!((v.rank, v.alpha, v.alpha_stored), (8, 8.0, false));
}

#[test]
fn diffusers_old_style_file_is_parsed() {
    let file = LoraFile::read(fixture("diffusers_old.safetensors")).unwrap();
    assert_eq!(file.format, LoraFormat::Diffusers);
    assert_eq!(file.networks(), [Network::Unet, Network::TextEncoder]);
    let out = module(
        &file,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out",
    );
    assert_eq!(
        out.diffusers_path.as_deref(),
        Some("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
    );
    let fc1 = module(&file, "text_encoder.text_model.encoder.layers.0.mlp.fc1");
    assert_eq!((fc1.rank, fc1.in_features, fc1.out_features), (4, 16, 32));
    assert!(file.module("unet.mid_block.attentions.0.proj_in").is_some());
}

#[test]
fn kohya_names_map_to_diffusers_paths() {
    assert_eq!(
        kohya_to_diffusers(
            "lora_unet_up_blocks_2_resnets_1_conv_shortcut",
            Network::Unet
        )
        .as_deref(),
        Some("unet.up_blocks.2.resnets.1.conv_shortcut")
    );
    assert_eq!(
        kohya_to_diffusers("lora_unet_down_blocks_1_downsamplers_0_conv", Network::Unet).as_deref(),
        Some("unet.down_blocks.1.downsamplers.0.conv")
    );
    // SD 1.x original-checkpoint names are not mapped.
    assert_eq!(
        kohya_to_diffusers("lora_unet_input_blocks_1_1_proj_in", Network::Unet),
        None
    );
    assert_eq!(kohya_to_diffusers("not_kohya_at_all", Network::Unet), None);
}

/// The tensors of a fixture, as (name, dtype, shape, bytes).
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn tensors_of(name: &str) -> Tensors {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Tensors = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Write `tensors` as `name` in `dir`.
fn write(dir: &Path, name: &str, tensors: &Tensors) -> PathBuf {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, dtype, shape, data)| {
            (
                k.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    path
}

fn read_err(path: &Path) -> KohyaError {
    let err = LoraFile::read(path).expect_err("a broken file must not parse");
    // Every error names the file.
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    err
}

#[test]
fn rank_mismatch_is_a_typed_error() {
    let err = read_err(&fixture("broken_rank.safetensors"));
    assert!(
        matches!(&err, KohyaError::RankMismatch { module, down: 4, up: 2, .. }
            if module.ends_with("attn1_to_v")),
        "{err:?}"
    );
}

#[test]
fn a_missing_half_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let up = format!("{BLOCK}_attn1_to_q.lora_up.weight");
    let mut t = tensors_of("sd15_kohya.safetensors");
    t.retain(|(k, ..)| *k != up);
    let err = read_err(&write(dir.path(), "no_up.safetensors", &t));
    assert!(
        matches!(&err, KohyaError::MissingHalf { missing, .. } if *missing == up),
        "{err:?}"
    );
    // An alpha alone names the missing down projection.
    let mut t = tensors_of("sdxl_kohya.safetensors");
    let te2 = "lora_te2_text_model_encoder_layers_0_self_attn_out_proj";
    t.retain(|(k, ..)| !k.starts_with(te2) || k.ends_with(".alpha"));
    let err = read_err(&write(dir.path(), "alpha_only.safetensors", &t));
    assert!(
        matches!(&err, KohyaError::MissingHalf { present, missing, .. }
            if *present == format!("{te2}.alpha") && *missing == format!("{te2}.lora_down.weight")),
        "{err:?}"
    );
}

#[test]
fn non_finite_alphas_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let key = "lora_unet_down_blocks_0_resnets_0_conv1.alpha";
    for (value, file) in [
        (f32::NAN, "nan.safetensors"),
        (f32::INFINITY, "inf.safetensors"),
    ] {
        let mut t = tensors_of("sd15_kohya.safetensors");
        let alpha = t.iter_mut().find(|(k, ..)| k == key).unwrap();
        alpha.3 = value.to_le_bytes().to_vec();
        let err = read_err(&write(dir.path(), file, &t));
        assert!(
            matches!(&err, KohyaError::NonFiniteAlpha { key: k, .. } if k == key),
            "{err:?}"
        );
    }
    // An alpha that is not one value.
    let mut t = tensors_of("sd15_kohya.safetensors");
    let alpha = t.iter_mut().find(|(k, ..)| k == key).unwrap();
    alpha.2 = vec![2];
    alpha.3 = [1f32.to_le_bytes(), 2f32.to_le_bytes()].concat();
    let err = read_err(&write(dir.path(), "two.safetensors", &t));
    assert!(matches!(err, KohyaError::BadAlpha { .. }), "{err:?}");
}

#[test]
fn other_malformed_files_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Kohya and diffusers keys in one file.
    let mut t = tensors_of("sd15_kohya.safetensors");
    t.extend(tensors_of("diffusers_peft.safetensors"));
    let err = read_err(&write(dir.path(), "mixed.safetensors", &t));
    assert!(matches!(err, KohyaError::MixedFormats { .. }), "{err:?}");
    // A LoHa tensor.
    let mut t = tensors_of("sdxl_kohya.safetensors");
    let mut hada = t[0].clone();
    hada.0 = "lora_unet_mid_block_resnets_0_time_emb_proj.hada_w1_a".into();
    t.push(hada);
    let err = read_err(&write(dir.path(), "loha.safetensors", &t));
    assert!(
        matches!(&err, KohyaError::UnknownKey { key, .. } if key.ends_with("hada_w1_a")),
        "{err:?}"
    );
    // Down 3-D.
    let mut t = tensors_of("broken_rank.safetensors");
    let down = t
        .iter_mut()
        .find(|(k, ..)| k.ends_with("lora_down.weight"))
        .unwrap();
    down.2 = vec![4, 4, 4];
    let err = read_err(&write(dir.path(), "3d.safetensors", &t));
    assert!(matches!(err, KohyaError::BadShape { .. }), "{err:?}");
    // No tensors.
    let err = read_err(&write(dir.path(), "empty.safetensors", &Vec::new()));
    assert!(matches!(err, KohyaError::Empty { .. }), "{err:?}");
    // Truncated data, and a file shorter than its header.
    let bytes = std::fs::read(fixture("sdxl_kohya.safetensors")).unwrap();
    for (name, len) in [
        ("cut.safetensors", bytes.len() - 10),
        ("tiny.safetensors", 5),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes[..len]).unwrap();
        let err = read_err(&path);
        assert!(matches!(err, KohyaError::Corrupt { .. }), "{err:?}");
    }
    let err = read_err(&dir.path().join("absent.safetensors"));
    assert!(matches!(err, KohyaError::Io { .. }), "{err:?}");
}
