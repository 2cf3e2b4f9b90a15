//! `peft_lora::kohya::combine` is exact: the two kohya files of tests/fixtures/sd_fuse combined
//! with weights 0.7 and 0.5, then fused with weight 1, give the weights diffusers fuses from
//! the two files (tests/fixtures/sd_fuse/expected); bad inputs are typed errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::f16;
use peft_lora::kohya::{CombineError, LoraFile, LoraFormat, ModuleKind, combine, fuse};
use safetensors::Dtype;
use safetensors::tensor::SafeTensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

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
            (name, (v.shape().to_vec(), values))
        })
        .collect()
}

fn weighted() -> Vec<(PathBuf, f64)> {
    let dir = fixtures().join("sd_fuse");
    vec![
        (dir.join("a.safetensors"), 0.7),
        (dir.join("b.safetensors"), 0.5),
    ]
}

#[test]
fn combined_file_fuses_to_the_two_file_fuse() {
    let tmp = tempfile::tempdir().unwrap();
    let combined = tmp.path().join("both.safetensors");
    let report = combine(&weighted(), &combined).unwrap();
    assert_eq!(report.dtype, "F32");
    assert_eq!(report.loras.len(), 2);
    assert_eq!((report.loras[0].modules, report.loras[1].modules), (6, 5));
    // 6 + 5 modules, one (`to_q`) in both.
    assert_eq!(report.modules, 10);
    assert_eq!(report.max_rank, 6);

    let lora = LoraFile::read(&combined).unwrap();
    assert_eq!(lora.format, LoraFormat::Kohya);
    assert_eq!(lora.modules.len(), 10);
    for m in &lora.modules {
        assert!(m.alpha_stored, "{}", m.name);
        assert_eq!(m.scale(), 1.0, "{}", m.name);
    }
    let q = lora
        .module("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
        .unwrap();
    assert_eq!(q.rank, 2 + 4);
    let conv = lora
        .module("lora_unet_down_blocks_0_resnets_0_conv1")
        .unwrap();
    assert_eq!(conv.kind, ModuleKind::Conv { kernel: [3, 3] });
    let raw = tensors(&combined);
    assert_eq!(
        raw["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].0,
        [8, 2, 1, 1]
    );

    let out = tmp.path().join("fused");
    fuse(
        &fixtures().join("sd_fuse/model"),
        &[(combined.clone(), 1.0)],
        &out,
    )
    .unwrap();
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let ours = tensors(&out.join(file));
        let want = tensors(&fixtures().join("sd_fuse/expected").join(file));
        assert_eq!(ours.len(), want.len(), "{file}");
        let mut worst = 0f32;
        for (name, (shape, values)) in &want {
            let (our_shape, our_values) = &ours[name];
            assert_eq!(our_shape, shape, "{file}: {name}");
            for (a, b) in our_values.iter().zip(values) {
                worst = worst.max((a - b).abs());
            }
        }
        eprintln!("{file}: max abs diff vs the two-file fuse {worst:e}");
        assert!(worst < 1e-5, "{file}: differs by {worst}");
    }
}

#[test]
fn bad_inputs_are_typed_errors_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let a = weighted()[0].0.clone();

    // One module, two shapes: both files named.
    let wrong = fixtures().join("sd_fuse/wrong_shape.safetensors");
    let err = combine(&[(a.clone(), 1.0), (wrong.clone(), 1.0)], &out).unwrap_err();
    match &err {
        CombineError::Conflict {
            module,
            first_file,
            second_file,
            ..
        } => {
            assert_eq!(
                module,
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
            );
            assert_eq!((first_file, second_file), (&a, &wrong));
        }
        other => panic!("{other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("a.safetensors") && msg.contains("wrong_shape.safetensors"));
    assert!(err.is_bad_input());

    let dora = fixtures().join("kohya/sd15_kohya.safetensors");
    assert!(matches!(
        combine(&[(dora, 1.0)], &out).unwrap_err(),
        CombineError::Dora { .. }
    ));

    let diffusers = fixtures().join("kohya/diffusers_peft.safetensors");
    let err = combine(&[(a.clone(), 1.0), (diffusers, 1.0)], &out).unwrap_err();
    assert!(
        matches!(
            err,
            CombineError::NotKohya {
                format: LoraFormat::PeftLike,
                ..
            }
        ),
        "{err:?}"
    );

    assert!(matches!(
        combine(&[(a.clone(), f64::NAN)], &out).unwrap_err(),
        CombineError::BadWeight { .. }
    ));
    assert!(matches!(
        combine(&[], &out).unwrap_err(),
        CombineError::NoInputs
    ));
    let missing = combine(&[(tmp.path().join("none.safetensors"), 1.0)], &out).unwrap_err();
    assert!(matches!(missing, CombineError::Lora(_)) && missing.is_bad_input());

    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}
