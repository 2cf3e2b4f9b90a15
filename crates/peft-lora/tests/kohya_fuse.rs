//! `peft_lora::kohya::fuse` against diffusers: tests/fixtures/sd_fuse (written by
//! tests/fixtures/gen/sd_fuse.py) holds a tiny diffusers folder, two kohya LoRA files and the
//! UNet / text encoder weights diffusers' `load_lora_weights` + `set_adapters` + `fuse_lora`
//! make of them with weights 0.7 and 0.5.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::f16;
use peft_lora::kohya::{FuseError, fuse};
use safetensors::Dtype;
use safetensors::tensor::{SafeTensors, TensorView};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sd_fuse")
}

const UNET: &str = "unet/diffusion_pytorch_model.safetensors";
const TE: &str = "text_encoder/model.safetensors";

type Tensors = HashMap<String, (Dtype, Vec<usize>, Vec<f32>)>;

/// Every tensor of a safetensors file, as f32.
fn tensors(file: &Path) -> Tensors {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let values = match v.dtype() {
                Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                Dtype::F16 => v
                    .data()
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => panic!("{name}: {other:?}"),
            };
            (name, (v.dtype(), v.shape().to_vec(), values))
        })
        .collect()
}

/// The header (names, order, dtypes, offsets, metadata) of a safetensors file, as bytes.
fn header(file: &Path) -> Vec<u8> {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[..8 + n].to_vec()
}

/// Max |a - b| over two files' tensors, which must have the same names and shapes.
fn max_diff(ours: &Tensors, want: &Tensors, what: &str) -> f32 {
    assert_eq!(ours.len(), want.len(), "{what}");
    let mut worst = 0f32;
    for (name, (_, shape, values)) in want {
        let (_, our_shape, our_values) = ours
            .get(name)
            .unwrap_or_else(|| panic!("{what}: no `{name}`"));
        assert_eq!(our_shape, shape, "{what}: {name}");
        for (a, b) in our_values.iter().zip(values) {
            worst = worst.max((a - b).abs());
        }
    }
    worst
}

fn weighted() -> Vec<(PathBuf, f64)> {
    vec![
        (fixtures().join("a.safetensors"), 0.7),
        (fixtures().join("b.safetensors"), 0.5),
    ]
}

#[test]
fn two_kohya_files_fuse_as_diffusers_does() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("model");
    let out = tmp.path().join("fused");
    let report = fuse(&model, &weighted(), &out).unwrap();

    for (component, file) in [("unet", UNET), ("text_encoder", TE)] {
        let ours = tensors(&out.join(file));
        let want = tensors(&fixtures().join("expected").join(file));
        let d = max_diff(&ours, &want, file);
        eprintln!("{file}: max abs diff vs diffusers {d:e}");
        assert!(d < 1e-5, "{file}: differs from diffusers by {d}");
        // Same names, order, dtypes, offsets and metadata as the input file.
        assert_eq!(
            header(&out.join(file)),
            header(&model.join(file)),
            "{component}"
        );
    }
    // Everything else is copied unchanged.
    for file in [
        "model_index.json",
        "unet/config.json",
        "text_encoder/config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(file)).unwrap(),
            std::fs::read(model.join(file)).unwrap(),
            "{file}"
        );
    }
    assert_eq!(report.copied_files, 3);
    assert_eq!(
        report
            .loras
            .iter()
            .map(|l| (l.fused, l.skipped.len(), l.weight))
            .collect::<Vec<_>>(),
        [(6, 0, 0.7), (5, 0, 0.5)]
    );
    let changed: Vec<(&str, usize)> = report
        .components
        .iter()
        .map(|c| (c.component.as_str(), c.tensors))
        .collect();
    assert_eq!(changed, [("unet", 7), ("text_encoder", 3)]);
    // Weights no LoRA adapts are untouched, bit for bit.
    let before = tensors(&model.join(UNET));
    let after = tensors(&out.join(UNET));
    let same = before.iter().filter(|(k, v)| after[*k] == **v).count();
    assert_eq!(same, before.len() - 7);
}

/// Copy the fixture model to `dir`, rewriting one component file through `rewrite`.
fn model_copy(
    dir: &Path,
    file: &str,
    rewrite: impl Fn(&str, &[usize], &[f32]) -> (String, Dtype, Vec<u8>),
) -> PathBuf {
    let model = dir.join("model");
    for f in [
        "model_index.json",
        "unet/config.json",
        UNET,
        "text_encoder/config.json",
        TE,
    ] {
        std::fs::create_dir_all(model.join(f).parent().unwrap()).unwrap();
        std::fs::copy(fixtures().join("model").join(f), model.join(f)).unwrap();
    }
    let source = tensors(&fixtures().join("model").join(file));
    let mut names: Vec<&String> = source.keys().collect();
    names.sort();
    let rewritten: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = names
        .iter()
        .map(|name| {
            let (_, shape, values) = &source[*name];
            let (new_name, dtype, bytes) = rewrite(name, shape, values);
            (new_name, dtype, shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = rewritten
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::tensor::serialize(views, None).unwrap();
    std::fs::write(model.join(file), bytes).unwrap();
    model
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn a_text_encoder_saved_by_transformers_5_has_no_text_model_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path(), TE, |name, _, values| {
        let flat = name.strip_prefix("text_model.").unwrap().to_string();
        (flat, Dtype::F32, f32_bytes(values))
    });
    // A variant beside a fused file would keep unfused weights: left out. Other files are
    // copied.
    let variant = "unet/diffusion_pytorch_model.fp16.safetensors";
    std::fs::write(model.join(variant), b"stale").unwrap();
    std::fs::write(model.join("unet/README.txt"), b"notes").unwrap();
    let out = tmp.path().join("fused");
    let report = fuse(&model, &weighted(), &out).unwrap();
    assert_eq!(report.dropped_files, [PathBuf::from(variant)]);
    assert!(!out.join(variant).exists());
    assert_eq!(
        std::fs::read(out.join("unet/README.txt")).unwrap(),
        b"notes"
    );
    assert_eq!(report.copied_files, 4);
    let ours = tensors(&out.join(TE));
    let want: Tensors = tensors(&fixtures().join("expected").join(TE))
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap().to_string(), v))
        .collect();
    assert!(max_diff(&ours, &want, TE) < 1e-5);
}

#[test]
fn a_float16_unet_stays_float16() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path(), UNET, |name, _, values| {
        let bytes = values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        (name.to_string(), Dtype::F16, bytes)
    });
    let out = tmp.path().join("fused");
    let report = fuse(&model, &weighted(), &out).unwrap();
    assert_eq!(report.components[0].dtypes, ["F16"]);
    assert_eq!(header(&out.join(UNET)), header(&model.join(UNET)));
    let ours = tensors(&out.join(UNET));
    let want = tensors(&fixtures().join("expected").join(UNET));
    for (name, (dtype, _, values)) in &ours {
        assert_eq!(*dtype, Dtype::F16, "{name}");
        for (a, b) in values.iter().zip(&want[name].2) {
            // The base rounded to f16, then the sum rounded once more.
            assert!(
                (a - b).abs() <= 2e-3 * b.abs().max(1.0),
                "{name}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn bad_inputs_are_typed_errors_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("model");
    let out = tmp.path().join("fused");

    let nomatch = fixtures().join("nomatch.safetensors");
    let err = fuse(&model, &[(nomatch.clone(), 1.0)], &out).unwrap_err();
    assert!(
        matches!(&err, FuseError::NoMatch { file, .. } if *file == nomatch),
        "{err}"
    );
    assert!(err.to_string().contains("nomatch.safetensors"), "{err}");
    assert!(err.is_bad_input());

    let wrong = fixtures().join("wrong_shape.safetensors");
    let err = fuse(&model, &[(wrong, 1.0)], &out).unwrap_err();
    match &err {
        FuseError::ShapeMismatch {
            module,
            tensor,
            expected,
            found,
            ..
        } => {
            assert!(module.ends_with("attn1_to_q"), "{module}");
            assert_eq!(
                tensor,
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
            );
            assert_eq!((&expected[..], &found[..]), (&[8, 8][..], &[8, 16][..]));
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("wrong_shape.safetensors"), "{err}");

    // DoRA modules are refused (sd15_kohya.safetensors has a `dora_scale`).
    let dora = fixtures().join("../kohya/sd15_kohya.safetensors");
    let err = fuse(&model, &[(dora, 1.0)], &out).unwrap_err();
    assert!(matches!(err, FuseError::Dora { .. }), "{err}");
    assert!(err.to_string().contains("cannot be fused yet"), "{err}");

    let err = fuse(
        &model,
        &[(fixtures().join("a.safetensors"), f64::NAN)],
        &out,
    )
    .unwrap_err();
    assert!(matches!(err, FuseError::BadWeight { .. }), "{err}");

    // A later file's error stops the fuse before anything is written.
    let mut files = weighted();
    files.push((nomatch, 1.0));
    assert!(fuse(&model, &files, &out).is_err());
    assert!(!out.exists());

    // Not over or into the model folder; not over a folder that is not a model.
    let err = fuse(&model, &weighted(), &model.join("fused")).unwrap_err();
    assert!(matches!(err, FuseError::OutputInsideModel { .. }), "{err}");
    let notes = tmp.path().join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("keep.txt"), "keep").unwrap();
    let err = fuse(&model, &weighted(), &notes).unwrap_err();
    assert!(matches!(err, FuseError::OutputNotAModel { .. }), "{err}");
    assert!(notes.join("keep.txt").is_file());

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = fuse(&empty, &weighted(), &out).unwrap_err();
    assert!(matches!(err, FuseError::NoComponents { .. }), "{err}");
}

#[test]
fn a_second_fuse_replaces_the_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("model");
    let out = tmp.path().join("fused");
    fuse(&model, &weighted()[..1], &out).unwrap();
    std::fs::write(out.join("stale.txt"), "old").unwrap();
    fuse(&model, &weighted(), &out).unwrap();
    assert!(!out.join("stale.txt").exists());
    let d = max_diff(
        &tensors(&out.join(UNET)),
        &tensors(&fixtures().join("expected").join(UNET)),
        UNET,
    );
    assert!(d < 1e-5);
}
