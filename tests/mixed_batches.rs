//! Mixed-adapter batches (PEFT's `adapter_names=[...]`): one forward in which each row runs
//! its own adapter, against PEFT (`tests/fixtures/gen/mixed_tiny.py`) for LoRA on Llama (GQA),
//! GPT-2 (Conv1D) and a BERT classifier with per-adapter `modules_to_save` heads, plus batched
//! generation with left-padded prompts; prefix-tuned rows (PEFT has no mixed prompt learning)
//! against each row run alone; and the errors PEFT gives (unknown names, merged adapters).

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_peft::core::{PeftConfigBase, PeftError, PeftModel};
use burn_peft::models::{
    GenerationConfig, HfModel, ModelError, ModelInputs, Task, from_pretrained, generate,
    generate_batch,
};
use burn_peft::prefix::PrefixTuningConfig;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tensor_i64(file: &Path, key: &str) -> (Vec<i64>, Vec<usize>) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(key).unwrap();
    let values = v
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (values, v.shape().to_vec())
}

fn tensor_f32(file: &Path, key: &str) -> Vec<f32> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(key)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn int(values: Vec<i64>, shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn inputs(name: &str, device: &Device) -> (ModelInputs, Vec<i64>) {
    let file = fixtures()
        .join("models")
        .join(name)
        .join("inputs.safetensors");
    let (ids, shape) = tensor_i64(&file, "input_ids");
    let (mask, _) = tensor_i64(&file, "attention_mask");
    let shape = [shape[0], shape[1]];
    let types = name
        .starts_with("bert")
        .then(|| int(tensor_i64(&file, "token_type_ids").0, shape, device));
    (
        ModelInputs {
            input_ids: int(ids, shape, device),
            attention_mask: Some(int(mask.clone(), shape, device)),
            token_type_ids: types,
            pixel_values: None,
        },
        mask,
    )
}

fn task(name: &str) -> Task {
    if name.ends_with("_cls") {
        Task::SequenceClassification { num_labels: 3 }
    } else {
        Task::CausalLm
    }
}

fn model_with(name: &str, adapters: &[&str], device: &Device) -> PeftModel<HfModel> {
    let dir = fixtures().join("models").join(name);
    let pretrained = from_pretrained(dir.to_str().unwrap(), task(name), device).unwrap();
    let mut model = PeftModel::new(pretrained.model);
    for adapter in adapters {
        let bundle = fixtures().join("mixed").join(name).join(adapter);
        model.load_adapter(&bundle, adapter).unwrap();
    }
    model
}

fn logits(
    model: &HfModel,
    inputs: &ModelInputs,
    ctx: &burn_peft::core::nn::ForwardContext,
) -> Vec<f32> {
    let out = model.forward_with(inputs, ctx).unwrap();
    out.logits
        .map(|t| t.into_data())
        .or_else(|| out.class_logits.map(|t| t.into_data()))
        .unwrap()
        .try_to_vec()
        .unwrap()
}

/// Largest difference over valid positions (`width` values per position; pooled outputs have
/// one position per row).
fn max_diff(a: &[f32], b: &[f32], mask: &[i64], width: usize, per_token: bool) -> f32 {
    a.chunks(width)
        .zip(b.chunks(width))
        .enumerate()
        .filter(|(i, _)| !per_token || mask[*i] == 1)
        .flat_map(|(_, (x, y))| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn case(name: &str) -> Value {
    let text =
        std::fs::read_to_string(fixtures().join("mixed").join(name).join("case.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn mixed_lora_batches_match_peft_adapter_names() {
    let device = Device::flex();
    for name in ["llama_gqa", "gpt2", "bert_cls"] {
        let model = model_with(name, &["sql", "chat"], &device);
        let case = case(name);
        let rows = strings(&case["rows"]);
        let rows: Vec<&str> = rows.iter().map(String::as_str).collect();
        let ctx = model.adapter_rows(&rows, &device).unwrap();
        let (inputs, mask) = inputs(name, &device);
        let ours = logits(model.model(), &inputs, &ctx);
        let expected = fixtures()
            .join("mixed")
            .join(name)
            .join("expected.safetensors");
        let theirs = tensor_f32(&expected, "logits");
        let per_token = !name.ends_with("_cls");
        let width = if per_token { 128 } else { 3 };
        let diff = max_diff(&ours, &theirs, &mask, width, per_token);
        assert!(diff < 1e-4, "{name}: {diff}");
        // The rows really differ by adapter: the active-adapter path gives other numbers.
        let plain = logits(model.model(), &inputs, &Default::default());
        assert!(
            max_diff(&plain, &theirs, &mask, width, per_token) > 1e-2,
            "{name}"
        );

        if let Some(prompts) = case.get("prompts") {
            let prompts: Vec<Vec<i64>> = prompts
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    p.as_array()
                        .unwrap()
                        .iter()
                        .map(|t| t.as_i64().unwrap())
                        .collect()
                })
                .collect();
            let gen_rows = strings(&case["gen_rows"]);
            let gen_rows: Vec<&str> = gen_rows.iter().map(String::as_str).collect();
            let ctx = model.adapter_rows(&gen_rows, &device).unwrap();
            let config = GenerationConfig {
                max_new_tokens: case["max_new_tokens"].as_u64().unwrap() as usize,
                pad_token_id: 0,
                ..Default::default()
            };
            let ours = generate_batch(model.model(), &prompts, &ctx, &config, &device).unwrap();
            let (want, shape) = tensor_i64(&expected, "generated");
            for (row, got) in ours.iter().enumerate() {
                let padded = &want[row * shape[1]..(row + 1) * shape[1]];
                let pad = padded.iter().take_while(|t| **t == 0).count();
                assert_eq!(
                    got.as_slice(),
                    &padded[pad..],
                    "{name}: generated row {row}"
                );
            }
            // And each row equals that adapter generating alone.
            let mut alone = model_with(name, &["sql", "chat"], &device);
            for (row, adapter) in gen_rows.iter().enumerate() {
                alone.set_adapter(adapter).unwrap();
                let single = generate(alone.model(), &prompts[row], &config, &device).unwrap();
                assert_eq!(single, ours[row], "{name}: row {row} alone");
            }
        }
    }
}

#[test]
fn rows_with_prefixes_of_different_lengths_equal_each_row_alone() {
    let device = Device::flex();
    device.seed(3);
    let mut model = model_with("llama_gqa", &["sql"], &device);
    model
        .load_adapter(fixtures().join("prefix/llama_gqa_table"), "long")
        .unwrap();
    let short = PrefixTuningConfig {
        num_virtual_tokens: 2,
        base: PeftConfigBase::for_task("CAUSAL_LM"),
        ..Default::default()
    };
    model.add_adapter("short", &short).unwrap();
    let (inputs, mask) = inputs("llama_gqa", &device);
    let rows = ["long", "sql", "short"];
    let ctx = model.adapter_rows(&rows, &device).unwrap();
    let mixed = logits(model.model(), &inputs, &ctx);
    let ids = inputs
        .input_ids
        .clone()
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .unwrap();
    let seq = 7;
    for (row, adapter) in rows.iter().enumerate() {
        model.set_adapter(adapter).unwrap();
        let len = mask[row * seq..(row + 1) * seq].iter().sum::<i64>() as usize;
        let single = ModelInputs {
            input_ids: int(ids[row * seq..row * seq + len].to_vec(), [1, len], &device),
            attention_mask: None,
            token_type_ids: None,
            pixel_values: None,
        };
        let alone = logits(model.model(), &single, &Default::default());
        let got = &mixed[row * seq * 128..(row * seq + len) * 128];
        let diff = got
            .iter()
            .zip(&alone)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-5, "row {row} ({adapter}): {diff}");
    }
    // Batched generation with those rows continues each prompt as it would alone.
    let prompts = vec![vec![5, 9, 17, 3, 44], vec![8, 21], vec![3, 3, 7]];
    let config = GenerationConfig {
        max_new_tokens: 5,
        ..Default::default()
    };
    let ctx = model.adapter_rows(&rows, &device).unwrap();
    let batch = generate_batch(model.model(), &prompts, &ctx, &config, &device).unwrap();
    for (row, adapter) in rows.iter().enumerate() {
        model.set_adapter(adapter).unwrap();
        let alone = generate(model.model(), &prompts[row], &config, &device).unwrap();
        assert_eq!(batch[row], alone, "row {row} ({adapter})");
    }
}

#[test]
fn mixed_batches_refuse_unknown_names_merged_adapters_and_wrong_counts() {
    let device = Device::flex();
    let mut model = model_with("gpt2", &["sql", "chat"], &device);
    match model.adapter_rows(&["sql", "sqll"], &device) {
        Err(PeftError::AdapterNotFound { name, available }) => {
            assert_eq!(name, "sqll");
            assert_eq!(available, ["sql", "chat"]);
        }
        other => panic!("expected AdapterNotFound, got {other:?}"),
    }
    let (inputs, _) = inputs("gpt2", &device);
    let ctx = model.adapter_rows(&["sql", "chat"], &device).unwrap();
    match model.model().forward_with(&inputs, &ctx) {
        Err(ModelError::InputOutOfRange { input, .. }) => assert_eq!(input, "adapter_names"),
        other => panic!("expected a row-count error, got {other:?}"),
    }
    model.merge().unwrap();
    let err = model
        .adapter_rows(&["sql", "chat", "sql"], &device)
        .unwrap_err();
    assert!(err.to_string().contains("unmerge"), "{err}");
}

/// A model that passes the mixed batch's context to one site but calls plain `forward` on
/// another would run that site with the active adapter on every row, silently. In debug builds
/// the layer refuses instead, naming `forward_in`; with the context passed down (or once the
/// mixed context is gone) the same layers run.
#[test]
#[cfg(debug_assertions)]
fn a_plain_forward_during_a_mixed_batch_is_refused() {
    use burn::module::Module;
    use burn_peft::core::Adaptable;
    use burn_peft::core::nn::{ForwardContext, Linear, LinearConfig};
    use burn_peft::lora::LoraConfig;
    use std::panic::{AssertUnwindSafe, catch_unwind};

    #[derive(Module, Debug, Adaptable)]
    struct Net {
        proj: Linear,
        head: Linear,
        plain: Linear,
    }

    impl Net {
        /// The mistake: `head` does not get the context.
        fn forward_with_bug(&self, x: Tensor<2>, ctx: &ForwardContext) -> Tensor<2> {
            self.head.forward(self.proj.forward_in(x, ctx))
        }

        fn forward_with(&self, x: Tensor<2>, ctx: &ForwardContext) -> Tensor<2> {
            self.head.forward_in(self.proj.forward_in(x, ctx), ctx)
        }
    }

    let device = Device::flex();
    let net = Net {
        proj: LinearConfig::new(4, 4).init(&device),
        head: LinearConfig::new(4, 3).init(&device),
        plain: LinearConfig::new(4, 4).init(&device),
    };
    let mut model = PeftModel::new(net);
    for name in ["a", "b"] {
        let lora = LoraConfig::new(2).targets(["proj", "head"]).init(false);
        model.add_adapter(name, &lora).unwrap();
    }
    let x = Tensor::<2>::ones([2, 4], &device);
    let ctx = model.adapter_rows(&["a", "b"], &device).unwrap();
    let panic = catch_unwind(AssertUnwindSafe(|| {
        model.model().forward_with_bug(x.clone(), &ctx)
    }))
    .expect_err("a plain forward under a mixed batch must not run");
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .unwrap_or_default();
    assert!(
        message.contains("Linear::forward_in(x, ctx)") && message.contains("a, b"),
        "{message}"
    );
    // A layer without adapters has no per-row state to ignore.
    let _ = model.model().plain.forward(x.clone());
    // The context passed down: row i runs adapter i.
    let mixed = model.model().forward_with(x.clone(), &ctx).into_data();
    // An ordinary batch afterwards (here a default context) clears the mark, as does dropping
    // the mixed context: plain `forward` runs the active adapter again.
    let _ = model
        .model()
        .forward_with(x.clone(), &ForwardContext::default());
    let _ = model.model().proj.forward(x.clone());
    drop(ctx);
    model.set_adapter("b").unwrap();
    let alone = model
        .model()
        .forward_with_bug(x, &ForwardContext::default());
    let row = |t: burn::tensor::TensorData, r: usize| {
        t.try_to_vec::<f32>().unwrap()[r * 3..][..3].to_vec()
    };
    let diff = row(mixed, 1)
        .iter()
        .zip(row(alone.into_data(), 1))
        .map(|(m, a)| (m - a).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-5, "{diff}");
}
