//! Freezing is real: after `add_adapter` only adapter tensors (plus `modules_to_save` copies and
//! biases per `bias`) get gradients; one AdamW step leaves every base weight bit-identical and
//! changes every adapter tensor. Also: dropout only in training, only on the adapter input.

mod common;

use std::collections::HashMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use burn_peft::core::{BiasMode, PeftModel, TargetModules};
use burn_peft::lora::{InitLoraWeights, LoraConfig};
use common::{Tiny, input_ids};

/// Every float parameter's id and value (with its rank in the shape).
struct Snapshot(HashMap<ParamId, TensorData>);

impl ModuleVisitor for Snapshot {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.insert(param.id, param.val().into_data());
    }
}

fn has_grad(grads: &GradientsParams, id: ParamId, rank: usize) -> bool {
    match rank {
        1 => grads.get::<1>(id).is_some(),
        2 => grads.get::<2>(id).is_some(),
        other => panic!("unexpected parameter rank {other}"),
    }
}

fn snapshot<M: Module>(model: &M) -> HashMap<ParamId, TensorData> {
    let mut s = Snapshot(HashMap::new());
    model.visit(&mut s);
    s.0
}

fn config(bias: BiasMode) -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: Some(TargetModules::list(["q_proj", "v_proj", "embed_tokens"])),
        modules_to_save: Some(vec!["classifier".into()]),
        init_lora_weights: InitLoraWeights::Bool(false),
        bias,
        ..Default::default()
    }
}

fn one_adamw_step(bias: BiasMode) {
    let device = Device::flex().autodiff();
    device.seed(7);
    let mut model = PeftModel::new(Tiny::load(&device));
    model.add_adapter("default", &config(bias)).unwrap();
    let trainable = model.trainable_param_ids().clone();
    let before = snapshot(model.model());

    let logits = model.model().forward(input_ids(&device));
    let target = Tensor::<3>::random(logits.dims(), Distribution::Normal(0.0, 1.0), &device);
    let loss = (logits - target).powf_scalar(2.0).mean();
    let grads = GradientsParams::from_grads(loss.backward(), model.model());

    // Gradients exist for exactly the trainable parameters.
    for (id, data) in &before {
        let got = has_grad(&grads, *id, data.shape().len());
        assert_eq!(
            got,
            trainable.contains(id),
            "param {id}: gradient vs trainable set"
        );
    }
    assert_eq!(grads.len(), trainable.len());

    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.01)
        .init();
    model.update(|m| optim.step(1e-3, m, grads));
    let after = snapshot(model.model());
    assert_eq!(before.len(), after.len());
    for (id, old) in &before {
        let new = &after[id];
        if trainable.contains(id) {
            assert_ne!(old, new, "trainable param {id} did not move");
        } else {
            assert_eq!(old, new, "frozen param {id} changed");
        }
    }
}

#[test]
fn one_step_moves_adapters_only() {
    one_adamw_step(BiasMode::None);
}

#[test]
fn one_step_with_lora_only_bias_moves_targeted_biases() {
    one_adamw_step(BiasMode::LoraOnly);
    let device = Device::flex().autodiff();
    let mut model = PeftModel::new(Tiny::load(&device));
    model
        .add_adapter("default", &config(BiasMode::LoraOnly))
        .unwrap();
    let ids = model.trainable_param_ids();
    for layer in &model.model().layers {
        assert!(ids.contains(&layer.attn.q_proj.bias.as_ref().unwrap().id));
        assert!(ids.contains(&layer.attn.v_proj.bias.as_ref().unwrap().id));
        assert!(!ids.contains(&layer.mlp.up_proj.bias.as_ref().unwrap().id));
    }
}

#[test]
fn one_step_with_all_biases() {
    one_adamw_step(BiasMode::All);
}

#[test]
fn dropout_applies_in_training_only_and_only_to_the_adapter_input() {
    let device = Device::flex().autodiff();
    device.seed(3);
    let mut model = PeftModel::new(Tiny::load(&device));
    let config = LoraConfig {
        lora_dropout: 0.5,
        target_modules: Some(TargetModules::list(["q_proj"])),
        init_lora_weights: InitLoraWeights::Bool(false),
        ..Default::default()
    };
    model.add_adapter("default", &config).unwrap();
    let ids = input_ids(&device);
    let q = &model.model().layers[0].attn.q_proj;
    let x = Tensor::<2>::random([3, 16], Distribution::Normal(0.0, 1.0), &device);

    // Training: two calls differ (dropout on the adapter input) ...
    let a = q.forward(x.clone()).into_data();
    let b = q.forward(x.clone()).into_data();
    assert_ne!(a, b, "dropout should be active in training");
    // ... but the base path is untouched: with the adapter disabled, outputs are deterministic.
    model.disable_adapters().unwrap();
    let q = &model.model().layers[0].attn.q_proj;
    assert_eq!(
        q.forward(x.clone()).into_data(),
        q.forward(x.clone()).into_data()
    );
    model.enable_adapters().unwrap();

    // Validation (`valid()` drops autodiff and training flags): deterministic.
    let eval = model.model().valid();
    let x_eval = x.clone().inner();
    let q = &eval.layers[0].attn.q_proj;
    assert_eq!(
        q.forward(x_eval.clone()).into_data(),
        q.forward(x_eval).into_data()
    );
    let out1 = eval.forward(ids.clone().inner()).into_data();
    let out2 = eval.forward(ids.inner()).into_data();
    assert_eq!(out1, out2);
}
