//! An SD 2.x-style single file (OpenCLIP text encoder under `cond_stage_model.model.`, its
//! attention's q / k / v fused into one `in_proj_weight`) fuses to exactly the SD 1.x file's
//! result, rearranged: tests/fixtures/sd_single_file/tiny.safetensors with its CLIP text
//! encoder rewritten in the OpenCLIP layout, as diffusers' `convert_open_clip_checkpoint`
//! splits it back (rows `[0, d)`, `[d, 2d)`, `[2d, 3d)` of `in_proj_weight` are q, k, v). And an
//! SDXL-style file (`conditioner.embedders.0.transformer.` CLIP, `conditioner.embedders.1.model.`
//! OpenCLIP) with an SDXL kohya file (`lora_te1_`, `lora_te2_`) fuses each encoder as those do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::kohya::{FuseError, fuse};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

type Raw = HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn read(file: &Path) -> Raw {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write(tensors: &Raw, file: &Path) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (dtype, shape, data))| {
            (
                k.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, file).unwrap();
}

const CLIP: &str = "cond_stage_model.transformer.text_model.";
const OPEN_CLIP: &str = "cond_stage_model.model.";

/// The SD 1.x checkpoint `sd1` with its text encoder in the OpenCLIP layout.
fn open_clip_layout(sd1: &Raw) -> Raw {
    let mut out = Raw::new();
    let mut qkv: HashMap<String, [Option<Vec<u8>>; 3]> = HashMap::new();
    let mut shapes: HashMap<String, (Dtype, Vec<usize>)> = HashMap::new();
    for (key, (dtype, shape, data)) in sd1 {
        let Some(rest) = key.strip_prefix(CLIP) else {
            out.insert(key.clone(), (*dtype, shape.clone(), data.clone()));
            continue;
        };
        if rest.starts_with("embeddings.position_ids") {
            continue;
        }
        let renamed = rest
            .replace(
                "embeddings.token_embedding.weight",
                "token_embedding.weight",
            )
            .replace(
                "embeddings.position_embedding.weight",
                "positional_embedding",
            )
            .replace("final_layer_norm", "ln_final")
            .replace("encoder.layers.", "transformer.resblocks.")
            .replace("layer_norm1", "ln_1")
            .replace("layer_norm2", "ln_2")
            .replace(".fc1.", ".c_fc.")
            .replace(".fc2.", ".c_proj.")
            .replace(".self_attn", ".attn");
        let proj = ["q_proj", "k_proj", "v_proj"]
            .iter()
            .position(|p| renamed.contains(&format!(".{p}.")));
        match proj {
            Some(i) => {
                let (attn, param) = renamed.rsplit_once('.').unwrap();
                let attn = attn.rsplit_once('.').unwrap().0;
                let fused = format!("{OPEN_CLIP}{attn}.in_proj_{param}");
                qkv.entry(fused.clone()).or_default()[i] = Some(data.clone());
                let mut shape = shape.clone();
                shape[0] *= 3;
                shapes.insert(fused, (*dtype, shape));
            }
            None => {
                out.insert(
                    format!("{OPEN_CLIP}{renamed}"),
                    (*dtype, shape.clone(), data.clone()),
                );
            }
        }
    }
    for (key, parts) in qkv {
        let data = parts.into_iter().flat_map(Option::unwrap).collect();
        let (dtype, shape) = shapes.remove(&key).unwrap();
        out.insert(key, (dtype, shape, data));
    }
    // OpenCLIP's projection, `[width, projection_dim]`: its first axis is diffusers'
    // `text_proj_dim`, the q / k / v block height.
    let identity: Vec<u8> = (0..64)
        .flat_map(|i| f32::to_le_bytes(if i % 9 == 0 { 1.0 } else { 0.0 }))
        .collect();
    out.insert(
        format!("{OPEN_CLIP}text_projection"),
        (Dtype::F32, vec![8, 8], identity),
    );
    out
}

/// `a.safetensors` with its text-encoder `q_proj` module on `v_proj` instead (rows 16..24 of
/// the fused projection, so the row offset is exercised).
fn on_v_proj(dir: &Path) -> PathBuf {
    let a = read(&fixtures().join("sd_fuse/a.safetensors"));
    let renamed: Raw = a
        .into_iter()
        .map(|(k, v)| (k.replace("self_attn_q_proj", "self_attn_v_proj"), v))
        .collect();
    let file = dir.join("a_v.safetensors");
    write(&renamed, &file);
    file
}

#[test]
fn an_open_clip_in_proj_fuses_like_the_split_projections() {
    let tmp = tempfile::tempdir().unwrap();
    let sd1_file = fixtures().join("sd_single_file/tiny.safetensors");
    let sd1 = read(&sd1_file);
    let sd2_file = tmp.path().join("sd2.safetensors");
    write(&open_clip_layout(&sd1), &sd2_file);
    let loras = [
        (on_v_proj(tmp.path()), 0.7),
        (fixtures().join("sd_fuse/b.safetensors"), 0.5),
    ];
    let (out1, out2) = (
        tmp.path().join("1.safetensors"),
        tmp.path().join("2.safetensors"),
    );
    let r1 = fuse(&sd1_file, &loras, &out1).unwrap();
    let r2 = fuse(&sd2_file, &loras, &out2).unwrap();
    assert_eq!(r1.loras, r2.loras);
    // v_proj (in in_proj_weight), out_proj and fc1 (c_fc): three tensors in both layouts.
    let te = |r: &crate::kohya::FuseReport| {
        r.components
            .iter()
            .find(|c| c.component == "text_encoder")
            .map(|c| c.tensors)
    };
    assert_eq!((te(&r1), te(&r2)), (Some(3), Some(3)));
    let (fused1, fused2) = (read(&out1), read(&out2));
    let want = open_clip_layout(&fused1);
    assert_eq!(want.len(), fused2.len());
    for (key, (_, shape, data)) in &want {
        let (_, our_shape, ours) = &fused2[key];
        assert_eq!(our_shape, shape, "{key}");
        assert_eq!(ours, data, "`{key}` differs from the SD 1.x fuse");
    }
    let in_proj = format!("{OPEN_CLIP}transformer.resblocks.0.attn.in_proj_weight");
    assert_ne!(fused2[&in_proj], read(&sd2_file)[&in_proj]);
}

#[test]
fn a_wrong_q_k_v_block_is_a_typed_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut sd2 = open_clip_layout(&read(&fixtures().join("sd_single_file/tiny.safetensors")));
    // A projection of width 4 declares q / k / v blocks of 4 rows: the 24-row in_proj fits not.
    sd2.insert(
        format!("{OPEN_CLIP}text_projection"),
        (Dtype::F32, vec![4, 8], vec![0; 128]),
    );
    let file = tmp.path().join("sd2.safetensors");
    write(&sd2, &file);
    let lora = (fixtures().join("sd_fuse/a.safetensors"), 1.0);
    let err = fuse(&file, &[lora], &tmp.path().join("out.safetensors")).unwrap_err();
    assert!(matches!(err, FuseError::UnknownLayout { .. }), "{err}");
    assert!(err.to_string().contains("in_proj_weight"), "{err}");
    assert!(err.is_bad_input());
}

/// `raw` with the prefix `from` of its keys replaced by `to` (other keys unchanged).
fn reprefixed(raw: &Raw, from: &str, to: &str) -> Raw {
    raw.iter()
        .map(|(k, v)| match k.strip_prefix(from) {
            Some(rest) => (format!("{to}{rest}"), v.clone()),
            None => (k.clone(), v.clone()),
        })
        .collect()
}

#[test]
fn an_sdxl_file_fuses_both_text_encoders_where_diffusers_puts_them() {
    let tmp = tempfile::tempdir().unwrap();
    let sd1_file = fixtures().join("sd_single_file/tiny.safetensors");
    let sd1 = read(&sd1_file);
    let sd2_file = tmp.path().join("sd2.safetensors");
    let sd2 = open_clip_layout(&sd1);
    write(&sd2, &sd2_file);
    // SDXL's layout: CLIP ViT-L as `conditioner.embedders.0.transformer.`, OpenCLIP bigG as
    // `conditioner.embedders.1.model.` (diffusers' text_encoder / text_encoder_2).
    const TE1: &str = "conditioner.embedders.0.transformer.";
    const TE2: &str = "conditioner.embedders.1.model.";
    let mut sdxl = reprefixed(&sd1, "cond_stage_model.transformer.", TE1);
    sdxl.extend(
        sd2.iter()
            .filter(|(k, _)| k.starts_with(OPEN_CLIP))
            .map(|(k, v)| (format!("{TE2}{}", &k[OPEN_CLIP.len()..]), v.clone())),
    );
    let sdxl_file = tmp.path().join("sdxl.safetensors");
    write(&sdxl, &sdxl_file);
    // An SDXL kohya file: a.safetensors' text-encoder modules as `lora_te1_`, and again (on
    // v_proj) as `lora_te2_`.
    let a = read(&fixtures().join("sd_fuse/a.safetensors"));
    let mut xl_lora = reprefixed(&a, "lora_te_", "lora_te1_");
    let a_v = read(&on_v_proj(tmp.path()));
    xl_lora.extend(
        a_v.iter()
            .filter(|(k, _)| k.starts_with("lora_te_"))
            .map(|(k, v)| (k.replacen("lora_te_", "lora_te2_", 1), v.clone())),
    );
    let xl_lora_file = tmp.path().join("xl.safetensors");
    write(&xl_lora, &xl_lora_file);

    let out = |name: &str| tmp.path().join(name);
    fuse(
        &sd1_file,
        &[(fixtures().join("sd_fuse/a.safetensors"), 0.7)],
        &out("1"),
    )
    .unwrap();
    fuse(&sd2_file, &[(on_v_proj(tmp.path()), 0.7)], &out("2")).unwrap();
    let report = fuse(&sdxl_file, &[(xl_lora_file, 0.7)], &out("xl")).unwrap();
    let counts: Vec<(&str, usize)> = report
        .components
        .iter()
        .map(|c| (c.component.as_str(), c.tensors))
        .collect();
    assert_eq!(
        counts,
        [("unet", 4), ("text_encoder", 2), ("text_encoder_2", 2)]
    );
    let (fused1, fused2, fused_xl) = (read(&out("1")), read(&out("2")), read(&out("xl")));
    let mut want = reprefixed(&fused1, "cond_stage_model.transformer.", TE1);
    want.extend(
        fused2
            .iter()
            .filter(|(k, _)| k.starts_with(OPEN_CLIP))
            .map(|(k, v)| (format!("{TE2}{}", &k[OPEN_CLIP.len()..]), v.clone())),
    );
    assert_eq!(want.len(), fused_xl.len());
    for (key, value) in &want {
        assert_eq!(
            &fused_xl[key], value,
            "`{key}` differs from the SD 1.x / 2.x fuses"
        );
    }
}
