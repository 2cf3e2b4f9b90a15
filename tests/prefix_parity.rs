//! Prefix tuning against PEFT 0.21.2 on the tiny models (`tests/fixtures/gen/prefix_tiny.py`):
//! logits on padded batches for GPT-2, Llama with GQA (tables trained with and without the
//! projection MLP) and a BERT classifier; greedy generation through the KV cache; the exported
//! table; gradients; training; bad bundles; PeftModel semantics.

mod common;

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_peft::core::{PeftConfigBase, PeftError, PeftModel, TargetModules};
use burn_peft::lora::LoraConfig;
use burn_peft::models::{GenerationConfig, HfModel, ModelInputs, Task, from_pretrained, generate};
use burn_peft::prefix::PrefixTuningConfig;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn ints(file: &Path, key: &str) -> Option<(Vec<i64>, Vec<usize>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(key).ok()?;
    let v = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Some((v, view.shape().to_vec()))
}

fn floats(file: &Path, key: &str) -> Vec<f32> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(key).unwrap();
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn base(name: &str, device: &Device) -> PeftModel<HfModel> {
    let dir = root().join("models").join(name);
    PeftModel::new(
        from_pretrained(dir.to_str().unwrap(), Task::Auto, device)
            .unwrap()
            .model,
    )
}

fn inputs(name: &str, device: &Device) -> (ModelInputs, Vec<i64>) {
    let file = root().join("models").join(name).join("inputs.safetensors");
    let t = |key: &str| {
        ints(&file, key).map(|(v, s)| Tensor::<2, Int>::from_data(TensorData::new(v, s), device))
    };
    let mask = ints(&file, "attention_mask").unwrap().0;
    (
        ModelInputs {
            input_ids: t("input_ids").unwrap(),
            attention_mask: t("attention_mask"),
            token_type_ids: t("token_type_ids"),
            pixel_values: None,
        },
        mask,
    )
}

fn logits(model: &HfModel, inputs: &ModelInputs) -> Vec<f32> {
    let out = model.forward(inputs).unwrap();
    match (out.logits, out.class_logits) {
        (Some(l), _) => l.into_data().try_to_vec::<f32>().unwrap(),
        (None, Some(l)) => l.into_data().try_to_vec::<f32>().unwrap(),
        _ => panic!("no logits"),
    }
}

/// Max |diff| on valid positions (`mask` per token for `[b, s, v]` logits, all for `[b, c]`).
fn diff(ours: &[f32], theirs: &[f32], mask: &[i64]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    let per = if ours.len() == mask.len() * (ours.len() / mask.len()) && ours.len() > 9 {
        ours.len() / mask.len()
    } else {
        usize::MAX
    };
    ours.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(i, _)| per == usize::MAX || mask[i / per] == 1)
        .map(|(_, (a, b))| (a - b).abs())
        .fold(0.0, f32::max)
}

fn parity(case: &str, base_name: &str) {
    let Some(device) = common::test_device(case) else {
        return;
    };
    let mut model = base(base_name, &device);
    let (inputs, mask) = inputs(base_name, &device);
    let plain = logits(model.model(), &inputs);
    model
        .load_adapter(root().join("prefix").join(case), "default")
        .unwrap();
    let ours = logits(model.model(), &inputs);
    let expected = root()
        .join("prefix")
        .join(case)
        .join("expected.safetensors");
    let d = diff(&ours, &floats(&expected, "logits"), &mask);
    eprintln!("{case}: logits max |diff| {d:.2e}");
    assert!(d < 1e-4, "{case}: logits differ from PEFT by {d}");
    assert!(
        diff(&plain, &ours, &mask) > 1e-3,
        "{case}: the prefix must change the output"
    );

    if let Some((want, _)) = ints(&expected, "greedy_ids") {
        let config = GenerationConfig {
            max_new_tokens: 6,
            ..Default::default()
        };
        let got = generate(model.model(), &[5, 9, 17, 3], &config, &device).unwrap();
        assert_eq!(
            got, want,
            "{case}: greedy ids (KV cache seeded with the prefix)"
        );
        let uncached = GenerationConfig {
            use_cache: false,
            ..config
        };
        assert_eq!(
            generate(model.model(), &[5, 9, 17, 3], &uncached, &device).unwrap(),
            want
        );
    }
}

#[test]
fn gpt2_prefix_table_matches_peft() {
    parity("gpt2_table", "gpt2");
}

#[test]
fn gpt2_prefix_from_projection_matches_peft() {
    parity("gpt2_mlp", "gpt2");
}

#[test]
fn llama_gqa_prefix_table_matches_peft() {
    parity("llama_gqa_table", "llama_gqa");
}

#[test]
fn llama_gqa_prefix_from_projection_matches_peft() {
    parity("llama_gqa_mlp", "llama_gqa");
}

#[test]
fn bert_classifier_prefix_matches_peft_with_transformers_4() {
    parity("bert_cls_table", "bert_cls");
}

#[test]
fn exported_bundle_equals_peft_layout_and_values() {
    let device = Device::flex();
    for (case, base_name) in [
        ("llama_gqa_table", "llama_gqa"),
        ("gpt2_mlp", "gpt2"),
        ("bert_cls_table", "bert_cls"),
    ] {
        let mut model = base(base_name, &device);
        let dir = root().join("prefix").join(case);
        model.load_adapter(&dir, "default").unwrap();
        let out = tempfile::tempdir().unwrap();
        model.save_adapter(out.path(), "default").unwrap();
        let names = |p: &Path| {
            let bytes = std::fs::read(p.join("adapter_model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut v: Vec<(String, Vec<usize>)> = st
                .tensors()
                .into_iter()
                .map(|(k, t)| (k, t.shape().to_vec()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(out.path()), names(&dir), "{case}");
        assert_eq!(
            floats(
                &out.path().join("adapter_model.safetensors"),
                "prompt_embeddings"
            ),
            floats(&dir.join("adapter_model.safetensors"), "prompt_embeddings"),
            "{case}"
        );
        let config = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
                .unwrap()
        };
        let (ours, theirs) = (config(out.path()), config(&dir));
        for key in [
            "num_layers",
            "token_dim",
            "num_attention_heads",
            "num_virtual_tokens",
            "num_transformer_submodules",
            "peft_type",
        ] {
            assert_eq!(ours[key], theirs[key], "{case}: {key}");
        }
    }
}

#[test]
fn fresh_prefix_config_resolves_like_peft() {
    let device = Device::flex();
    for (case, base_name, projection) in [
        ("llama_gqa_table", "llama_gqa", false),
        ("gpt2_mlp", "gpt2", true),
    ] {
        let mut model = base(base_name, &device);
        let config = PrefixTuningConfig {
            num_virtual_tokens: if base_name == "gpt2" { 4 } else { 5 },
            prefix_projection: projection,
            encoder_hidden_size: projection.then_some(16),
            base: PeftConfigBase::for_task("CAUSAL_LM"),
            ..Default::default()
        };
        model.add_adapter("default", &config).unwrap();
        let out = tempfile::tempdir().unwrap();
        model.save_adapter(out.path(), "default").unwrap();
        let read = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
                .unwrap()
        };
        let (mut ours, mut theirs) = (read(out.path()), read(&root().join("prefix").join(case)));
        for v in [&mut ours, &mut theirs] {
            v.as_object_mut().unwrap().remove("peft_version");
        }
        assert_eq!(ours, theirs, "{case}: saved config");
    }
}

struct Ids(Vec<(ParamId, usize)>);
impl ModuleVisitor for Ids {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push((param.id, D));
    }
}

#[test]
fn gradients_reach_only_prefix_parameters_and_training_lowers_the_loss() {
    for projection in [false, true] {
        let device = Device::flex().autodiff();
        device.seed(5);
        let mut model = base("llama_gqa", &device);
        let config = PrefixTuningConfig {
            num_virtual_tokens: 4,
            prefix_projection: projection,
            ..Default::default()
        };
        model.add_adapter("default", &config).unwrap();
        let trainable = model.trainable_param_ids().clone();
        assert_eq!(trainable.len(), if projection { 5 } else { 1 });
        let (inputs, _) = inputs("llama_gqa", &device);
        // A learnable target: make the model predict token 7 everywhere.
        let mut optim = AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(0.0)
            .init();
        let mut losses = Vec::new();
        for step in 0..30 {
            let logits = model.model().forward(&inputs).unwrap().logits.unwrap();
            let [b, s, v] = logits.dims();
            let log_probs = burn::tensor::activation::log_softmax(logits, 2);
            let loss = log_probs.slice([0..b, 0..s, 7..8]).mean().neg();
            losses.push(loss.clone().into_scalar::<f32>());
            let grads = GradientsParams::from_grads(loss.backward(), model.model());
            if step == 0 {
                let mut ids = Ids(Vec::new());
                model.model().visit(&mut ids);
                for (id, rank) in ids.0 {
                    let has = match rank {
                        1 => grads.get::<1>(id).is_some(),
                        2 => grads.get::<2>(id).is_some(),
                        _ => false,
                    };
                    assert_eq!(
                        has,
                        trainable.contains(&id),
                        "gradient on a frozen or missing param"
                    );
                }
                let _ = v;
            }
            model.update(|m| optim.step(0.1, m, grads));
        }
        let (first, last) = (losses[0], *losses.last().unwrap());
        eprintln!("prefix (projection {projection}): loss {first:.3} -> {last:.3}");
        assert!(last < first * 0.5, "loss did not fall: {losses:?}");
    }
}

#[test]
fn malformed_prefix_bundles_are_clear_errors() {
    let device = Device::flex();
    let src = root().join("prefix/gpt2_table");
    // Wrong table width: a bundle for another model (llama_gqa table on GPT-2 with its config).
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        tmp.path().join("adapter_config.json"),
    )
    .unwrap();
    std::fs::copy(
        root().join("prefix/llama_gqa_table/adapter_model.safetensors"),
        tmp.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut model = base("gpt2", &device);
    match model.load_adapter(tmp.path(), "default") {
        Err(PeftError::ShapeMismatch {
            key,
            expected,
            found,
            ..
        }) => {
            assert_eq!(key, "prompt_embeddings");
            assert_eq!(expected, [4, 128]);
            assert_eq!(found, [5, 64]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    // Wrong layer count for the model.
    let text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    std::fs::write(
        tmp.path().join("adapter_config.json"),
        text.replace("\"num_layers\": 2", "\"num_layers\": 3"),
    )
    .unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        tmp.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let err = model.load_adapter(tmp.path(), "default").unwrap_err();
    assert!(
        matches!(&err, PeftError::InvalidConfig { key, .. } if key == "num_layers"),
        "{err:?}"
    );
    assert!(err.to_string().contains("adapter_config.json"), "{err}");
    assert!(model.adapter_names().is_empty());
}

#[test]
fn prefix_adapters_switch_disable_delete_refuse_merge_and_combine_with_lora() {
    let device = Device::flex();
    let mut model = base("llama_gqa", &device);
    let (inputs, mask) = inputs("llama_gqa", &device);
    let plain = logits(model.model(), &inputs);
    model
        .load_adapter(root().join("prefix/llama_gqa_table"), "prefix")
        .unwrap();
    model
        .load_adapter(root().join("models/llama_gqa/lora"), "lora")
        .unwrap();
    let with_prefix = logits(model.model(), &inputs);

    assert!(matches!(
        model.merge(),
        Err(PeftError::NotSupportedByMethod { .. })
    ));

    model.set_adapter("lora").unwrap();
    let with_lora = logits(model.model(), &inputs);
    let lora_ref = floats(
        &root().join("models/llama_gqa/lora/expected.safetensors"),
        "logits",
    );
    assert!(diff(&with_lora, &lora_ref, &mask) < 1e-4);

    model.set_adapters(&["prefix", "lora"]).unwrap();
    let both = logits(model.model(), &inputs);
    assert!(diff(&both, &with_prefix, &mask) > 1e-3 && diff(&both, &with_lora, &mask) > 1e-3);

    model.disable_adapters().unwrap();
    assert!(diff(&logits(model.model(), &inputs), &plain, &mask) < 1e-6);
    model.enable_adapters().unwrap();

    model.delete_adapter("prefix").unwrap();
    assert_eq!(model.adapter_names(), ["lora"]);
    assert!(diff(&logits(model.model(), &inputs), &with_lora, &mask) < 1e-6);

    // `target_modules` never reaches the prefix site: a regex matching everything adapts the
    // model's linear and embedding layers only.
    let lora_everything = LoraConfig {
        target_modules: Some(TargetModules::Regex(".*".into())),
        ..Default::default()
    };
    let report = model.add_adapter("wide", &lora_everything).unwrap();
    assert!(report.adapted.iter().all(|p| !p.contains("prompt_encoder")));
    assert_eq!(report.adapted.len(), 2 * 7 + 2);
}
