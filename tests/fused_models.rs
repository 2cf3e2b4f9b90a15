//! Whole models on flex with peft-ops' fused kernels against the same models built from the
//! standard Burn ops (`burn_peft::ops::set_fused_enabled(false)`): the loss and the gradient of every
//! trainable parameter after one backward, on the tiny fixtures (BERT classifier, GPT-2, Llama
//! with GQA) with padded batches, for full fine-tuning (every weight, norms included), LoRA
//! (random `A` and `B`) and prefix tuning (keys longer than queries).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use burn_peft::core::{PeftMethod, PeftModel};
use burn_peft::lora::{InitLoraWeights, LoraConfig};
use burn_peft::models::{HfModel, Task, from_pretrained};
use burn_peft::prefix::PrefixTuningConfig;
use burn_peft::train::data::{Example, collate};
use burn_peft::train::{causal_lm_loss, classification_loss};

/// Relative tolerance (above magnitude 1) on the loss and on every gradient element.
const TOL: f32 = 1e-5;

fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

/// Rows of different lengths (so the batch is padded), ids below 100.
fn examples(lm: bool) -> Vec<Example> {
    (0..6)
        .map(|r| {
            let len = 5 + 3 * r;
            let ids: Vec<i64> = (0..len)
                .map(|i| 1 + ((r * 31 + i * 7) % 97) as i64)
                .collect();
            Example {
                label: (!lm).then_some(r % 3),
                labels: lm.then(|| ids.clone()),
                token_type_ids: vec![0; len],
                input_ids: ids,
                line: 0,
                segments: Vec::new(),
                image: None,
            }
        })
        .collect()
}

struct Grads(HashMap<ParamId, TensorData>, GradientsParams);

impl ModuleVisitor for Grads {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.1.get::<D>(param.id) {
            self.0.insert(param.id, g.into_data());
        }
    }
}

/// Loss and parameter gradients of one forward + backward.
fn step(model: &HfModel, lm: bool, device: &Device) -> (f32, HashMap<ParamId, TensorData>) {
    let data = examples(lm);
    let refs: Vec<&Example> = data.iter().collect();
    let batch = collate(&refs, 0, device);
    let out = model
        .forward(&burn_peft::models::ModelInputs {
            input_ids: batch.input_ids.clone(),
            attention_mask: Some(batch.attention_mask.clone()),
            token_type_ids: Some(batch.token_type_ids.clone()),
            pixel_values: None,
        })
        .expect("valid inputs");
    let loss = if lm {
        causal_lm_loss(out.logits.unwrap(), batch.lm_labels.unwrap()).0
    } else {
        classification_loss(out.class_logits.unwrap(), batch.labels.unwrap())
    };
    let value = loss.clone().into_scalar::<f32>();
    let grads = GradientsParams::from_grads(loss.backward(), model);
    let mut collect = Grads(HashMap::new(), grads);
    model.visit(&mut collect);
    (value, collect.0)
}

fn max_error(a: &TensorData, b: &TensorData) -> f32 {
    let (a, b) = (
        a.try_to_vec::<f32>().unwrap(),
        b.try_to_vec::<f32>().unwrap(),
    );
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

fn check(name: &str, method: Option<&dyn PeftMethod>) {
    let lm = name != "bert_cls";
    let task = if lm {
        Task::CausalLm
    } else {
        Task::SequenceClassification { num_labels: 3 }
    };
    let device = Device::flex().autodiff();
    device.seed(5);
    let pretrained = from_pretrained(model_dir(name).to_str().unwrap(), task, &device).unwrap();
    let mut model = PeftModel::new(pretrained.model);
    match method {
        Some(m) => {
            model.add_adapter("default", m).unwrap();
        }
        None => model.set_train_base(true).unwrap(),
    }
    burn_peft::ops::set_fused_enabled(true);
    let (loss_f, fused) = step(model.model(), lm, &device);
    burn_peft::ops::set_fused_enabled(false);
    let (loss_c, composed) = step(model.model(), lm, &device);
    burn_peft::ops::set_fused_enabled(true);
    let what = format!("{name} {}", method.map_or("full", |_| "adapter"));
    assert!(
        (loss_f - loss_c).abs() <= TOL * loss_c.abs().max(1.0),
        "{what}: loss {loss_f} vs {loss_c}"
    );
    assert!(!composed.is_empty(), "{what}: no gradients");
    assert_eq!(fused.len(), composed.len(), "{what}: gradient sets differ");
    for (id, c) in &composed {
        let err = max_error(&fused[id], c);
        assert!(err <= TOL, "{what}: parameter {id} gradient error {err:e}");
    }
}

fn lora() -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: Some("all-linear".into()),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    }
}

fn prefix() -> PrefixTuningConfig {
    PrefixTuningConfig {
        num_virtual_tokens: 5,
        ..Default::default()
    }
}

/// One test: the fused switch is process-wide.
#[test]
fn fused_models_match_composed_models() {
    for name in ["bert_cls", "gpt2", "llama_gqa"] {
        check(name, None);
        check(name, Some(&lora()));
        check(name, Some(&prefix()));
    }
}
