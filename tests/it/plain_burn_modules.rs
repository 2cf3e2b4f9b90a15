//! Any Burn model, unedited: a small transformer written with Burn's own layers
//! (`burn::nn::Linear`, `Embedding`, `LayerNorm`, an attention from `Linear` q/k/v/o) takes LoRA
//! from a PEFT-style config through `PeftModule` (weight space), and computes what the same
//! model built from burn-peft's adapter-aware layers computes with the same adapter through
//! `PeftModel`: outputs, a training step, bundles, merge and unmerge.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::{LayerNorm, LayerNormConfig};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use burn_peft::core::burn_modules::PeftModule;
use burn_peft::core::{PeftError, PeftMethod, PeftModel, bundle};
use serde_json::json;

const VOCAB: usize = 24;
const HIDDEN: usize = 16;
const HEADS: usize = 2;
const FFN: usize = 32;
const LAYERS: usize = 2;

/// Draws the model's weights in a fixed order from its own generator (not the device's, which
/// tests running in parallel share), so that both versions of the model get the same.
struct Weights {
    device: Device,
    state: u64,
}

impl Weights {
    fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            state: 0x9e37_79b9_7f4a_7c15,
        }
    }

    /// Uniform in `[-bound, bound)` (xorshift64*).
    fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                let bits = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
                let unit = bits as f64 / (1u64 << 53) as f64;
                ((2.0 * unit - 1.0) * bound) as f32
            })
            .collect()
    }

    fn matrix(&mut self, rows: usize, cols: usize) -> Tensor<2> {
        let values = self.uniform(rows * cols, 1.0 / (rows as f64).sqrt());
        Tensor::from_data(TensorData::new(values, [rows, cols]), &self.device)
    }

    fn vector(&mut self, n: usize) -> Tensor<1> {
        Tensor::from_data(TensorData::new(self.uniform(n, 0.1), [n]), &self.device)
    }

    fn norm(&self) -> LayerNorm {
        LayerNormConfig::new(HIDDEN).init(&self.device)
    }
}

/// One transformer, written once and instantiated twice: with Burn's layers and with
/// burn-peft's (`derive(Adaptable)` added). The field names are the module paths.
macro_rules! transformer {
    ($module:ident, $linear:path, $embedding:path, $make_linear:ident, $make_embedding:ident, [$($derive:path),*]) => {
        mod $module {
            use super::*;

            #[derive(Module, Debug $(, $derive)*)]
            pub struct SelfAttention {
                pub q_proj: $linear,
                pub k_proj: $linear,
                pub v_proj: $linear,
                pub o_proj: $linear,
            }

            #[derive(Module, Debug $(, $derive)*)]
            pub struct Mlp {
                pub up_proj: $linear,
                pub down_proj: $linear,
            }

            #[derive(Module, Debug $(, $derive)*)]
            pub struct Block {
                pub input_layernorm: LayerNorm,
                pub self_attn: SelfAttention,
                pub post_attention_layernorm: LayerNorm,
                pub mlp: Mlp,
            }

            #[derive(Module, Debug $(, $derive)*)]
            pub struct Transformer {
                pub embed_tokens: $embedding,
                pub layers: Vec<Block>,
                pub norm: LayerNorm,
                pub lm_head: $linear,
            }

            fn linear(w: &mut Weights, d_in: usize, d_out: usize, bias: bool) -> $linear {
                let weight = w.matrix(d_in, d_out);
                let bias = bias.then(|| w.vector(d_out));
                super::$make_linear(weight, bias)
            }

            impl Transformer {
                pub fn new(device: &Device) -> Self {
                    let mut w = Weights::new(device);
                    let embed_tokens = super::$make_embedding(w.matrix(VOCAB, HIDDEN));
                    let layers = (0..LAYERS)
                        .map(|_| Block {
                            input_layernorm: w.norm(),
                            self_attn: SelfAttention {
                                q_proj: linear(&mut w, HIDDEN, HIDDEN, true),
                                k_proj: linear(&mut w, HIDDEN, HIDDEN, true),
                                v_proj: linear(&mut w, HIDDEN, HIDDEN, true),
                                o_proj: linear(&mut w, HIDDEN, HIDDEN, false),
                            },
                            post_attention_layernorm: w.norm(),
                            mlp: Mlp {
                                up_proj: linear(&mut w, HIDDEN, FFN, true),
                                down_proj: linear(&mut w, FFN, HIDDEN, true),
                            },
                        })
                        .collect();
                    let norm = w.norm();
                    let lm_head = linear(&mut w, HIDDEN, VOCAB, false);
                    Self { embed_tokens, layers, norm, lm_head }
                }

                pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
                    let mut h = self.embed_tokens.forward(ids);
                    for block in &self.layers {
                        let a = block.self_attn.forward(block.input_layernorm.forward(h.clone()));
                        h = h + a;
                        let m = block.mlp.forward(block.post_attention_layernorm.forward(h.clone()));
                        h = h + m;
                    }
                    self.lm_head.forward(self.norm.forward(h))
                }
            }

            impl SelfAttention {
                fn forward(&self, x: Tensor<3>) -> Tensor<3> {
                    let [b, s, d] = x.dims();
                    let head_dim = d / HEADS;
                    let split = |t: Tensor<3>| t.reshape([b, s, HEADS, head_dim]).swap_dims(1, 2);
                    let q = split(self.q_proj.forward(x.clone()));
                    let k = split(self.k_proj.forward(x.clone()));
                    let v = split(self.v_proj.forward(x));
                    let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((head_dim as f64).sqrt());
                    let context = softmax(scores, 3).matmul(v).swap_dims(1, 2).reshape([b, s, d]);
                    self.o_proj.forward(context)
                }
            }

            impl Mlp {
                fn forward(&self, x: Tensor<3>) -> Tensor<3> {
                    self.down_proj.forward(gelu(self.up_proj.forward(x)))
                }
            }
        }
    };
}

fn plain_linear(weight: Tensor<2>, bias: Option<Tensor<1>>) -> burn::nn::Linear {
    burn::nn::Linear {
        weight: Param::from_tensor(weight),
        bias: bias.map(Param::from_tensor),
    }
}

fn plain_embedding(weight: Tensor<2>) -> burn::nn::Embedding {
    burn::nn::Embedding {
        weight: Param::from_tensor(weight),
    }
}

fn our_linear(weight: Tensor<2>, bias: Option<Tensor<1>>) -> burn_peft::core::nn::Linear {
    burn_peft::core::nn::Linear::from_tensors(weight, bias)
}

fn our_embedding(weight: Tensor<2>) -> burn_peft::core::nn::Embedding {
    burn_peft::core::nn::Embedding::from_tensor(weight)
}

transformer!(
    plain,
    burn::nn::Linear,
    burn::nn::Embedding,
    plain_linear,
    plain_embedding,
    []
);
transformer!(
    ours,
    burn_peft::core::nn::Linear,
    burn_peft::core::nn::Embedding,
    our_linear,
    our_embedding,
    [burn_peft::core::Adaptable]
);

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

fn ids(device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(
        TensorData::new(vec![1i64, 5, 9, 2, 23, 0, 7, 7, 14, 3], [2, 5]),
        device,
    )
}

fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}

fn data_diff(a: &TensorData, b: &TensorData) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (
        a.try_to_vec::<f32>().unwrap(),
        b.try_to_vec::<f32>().unwrap(),
    );
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A method from an `adapter_config.json`-style value, read as PEFT bundles are read.
fn method(config: serde_json::Value) -> Box<dyn PeftMethod> {
    bundle::parse_config_value(config, None).unwrap().method
}

fn lora(targets: &[&str]) -> serde_json::Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": targets,
        // Random A and B (PEFT's `init_lora_weights=False`), so the adapter changes the outputs.
        "init_lora_weights": false,
        "bias": "none",
    })
}

const TARGETS: [&str; 5] = ["q_proj", "v_proj", "up_proj", "down_proj", "embed_tokens"];

/// Every float parameter outside the adapters, by path (base values).
fn base_params<M: Module>(model: &M) -> BTreeMap<String, TensorData> {
    #[derive(Default)]
    struct Collect {
        path: Vec<String>,
        inside_adapter: usize,
        out: BTreeMap<String, TensorData>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, container: &str) {
            self.path.push(name.into());
            if container == "Reparameterization" || self.inside_adapter > 0 {
                self.inside_adapter += 1;
            }
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
            self.inside_adapter = self.inside_adapter.saturating_sub(1);
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.inside_adapter == 0 {
                self.out
                    .insert(self.path.join("."), param.val().into_data());
            }
        }
    }
    let mut collect = Collect::default();
    model.visit(&mut collect);
    collect.out
}

/// The plain model with LoRA on `TARGETS` and the same model built from burn-peft's layers with
/// the same adapter (moved over as a PEFT bundle).
fn pair(
    device: &Device,
    config: serde_json::Value,
    dir: &Path,
) -> (PeftModule<plain::Transformer>, PeftModel<ours::Transformer>) {
    let mut plain = PeftModule::new(plain::Transformer::new(device));
    plain
        .add_adapter("default", method(config).as_ref())
        .unwrap();
    plain.save_adapter(dir, "default").unwrap();
    let mut ours = PeftModel::new(ours::Transformer::new(device));
    ours.load_adapter_trainable(dir, "default").unwrap();
    (plain, ours)
}

fn assert_same_tensors(
    a: &BTreeMap<String, TensorData>,
    b: &BTreeMap<String, TensorData>,
    tolerance: f32,
) -> f32 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the same bundle keys"
    );
    let worst = a
        .iter()
        .map(|(k, v)| data_diff(v, &b[k]))
        .fold(0.0, f32::max);
    assert!(worst <= tolerance, "tensors differ by {worst}");
    worst
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[test]
fn the_two_models_are_the_same_model() {
    let device = Device::flex();
    let plain = plain::Transformer::new(&device);
    let ours = ours::Transformer::new(&device);
    let diff = max_diff(plain.forward(ids(&device)), ours.forward(ids(&device)));
    assert_eq!(diff, 0.0, "same weights, same forward");
}

#[test]
fn lora_on_plain_layers_computes_what_adapter_aware_layers_compute() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let (plain, ours) = pair(&device, lora(&TARGETS), dir.path());
    // Every Linear / Embedding named by the config, by Burn's module paths (= PEFT's).
    let mut adapted = plain.adapted_layers("default");
    adapted.sort();
    let mut expected = vec!["embed_tokens".to_string()];
    for l in 0..LAYERS {
        for m in [
            "self_attn.q_proj",
            "self_attn.v_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            expected.push(format!("layers.{l}.{m}"));
        }
    }
    expected.sort();
    assert_eq!(adapted, expected);
    // The bundle holds PEFT's keys for these paths, readable by PeftModel unchanged.
    let keys = plain.adapter_tensors("default").unwrap();
    assert!(keys.contains_key("base_model.model.layers.1.self_attn.q_proj.lora_A.weight"));
    assert!(keys.contains_key("base_model.model.embed_tokens.lora_embedding_B"));
    assert_same_tensors(&keys, &ours.adapter_tensors("default").unwrap(), 0.0);

    let ids = ids(&device);
    let base = plain::Transformer::new(&device).forward(ids.clone());
    let weight_space = plain.model().forward(ids.clone());
    let activations = ours.model().forward(ids);
    assert!(
        max_diff(weight_space.clone(), base) > 1e-2,
        "the adapter changes the outputs"
    );
    let diff = max_diff(weight_space, activations);
    println!("plain (weight space) vs adapter-aware layers: max |diff| {diff:.2e}");
    assert!(diff < 1e-5, "{diff}");
    assert_eq!(plain.trainable_report(), ours.trainable_report());
}

/// One AdamW step on each model from the same adapter and the same batch.
fn train_step(
    plain: &mut PeftModule<plain::Transformer>,
    ours: &mut PeftModel<ours::Transformer>,
    device: &Device,
) {
    let optim = || {
        AdamWConfig::new()
            .with_epsilon(1e-8)
            .with_weight_decay(0.0)
            .init()
    };
    device.seed(3);
    let target = Tensor::<3>::random([2, 5, VOCAB], Distribution::Normal(0.0, 1.0), device);
    let loss = (plain.model().forward(ids(device)) - target.clone())
        .powf_scalar(2.0)
        .mean();
    let grads = GradientsParams::from_grads(loss.backward(), plain.model());
    let mut optim_plain = optim();
    plain.update(|m| optim_plain.step(1e-2, m, grads));
    let loss = (ours.model().forward(ids(device)) - target)
        .powf_scalar(2.0)
        .mean();
    let grads = GradientsParams::from_grads(loss.backward(), ours.model());
    let mut optim_ours = optim();
    ours.update(|m| optim_ours.step(1e-2, m, grads));
}

#[test]
fn a_training_step_moves_only_the_adapters_and_matches_adapter_aware_layers() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let (mut plain, mut ours) = pair(&device, lora(&TARGETS), dir.path());
    let base_before = base_params(plain.model());
    let adapters_before = plain.adapter_tensors("default").unwrap();
    train_step(&mut plain, &mut ours, &device);

    let base_after = base_params(plain.model());
    assert_eq!(base_before.len(), base_after.len());
    for (path, before) in &base_before {
        assert_eq!(
            before.as_bytes(),
            base_after[path].as_bytes(),
            "base parameter `{path}` changed"
        );
    }
    let adapters_after = plain.adapter_tensors("default").unwrap();
    for (key, before) in &adapters_before {
        assert!(
            data_diff(before, &adapters_after[key]) > 1e-4,
            "adapter tensor `{key}` did not move"
        );
    }
    // The same step through activation-space LoRA gives the same adapter.
    let diff = assert_same_tensors(
        &adapters_after,
        &ours.adapter_tensors("default").unwrap(),
        1e-5,
    );
    println!(
        "adapter after one AdamW step, weight space vs adapter-aware layers: max |diff| {diff:.2e}"
    );
}

#[test]
fn the_bundle_round_trips_into_a_fresh_plain_model() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let (mut plain, mut ours) = pair(&device, lora(&TARGETS), dir.path());
    train_step(&mut plain, &mut ours, &device);
    let trained = tempfile::tempdir().unwrap();
    plain.save_adapter(trained.path(), "default").unwrap();

    let mut fresh = PeftModule::new(plain::Transformer::new(&device));
    let report = fresh.load_adapter(trained.path(), "default").unwrap();
    assert!(report.unknown_config_keys.is_empty());
    assert_same_tensors(
        &plain.adapter_tensors("default").unwrap(),
        &fresh.adapter_tensors("default").unwrap(),
        0.0,
    );
    let ids = ids(&device);
    let diff = max_diff(
        plain.model().forward(ids.clone()),
        fresh.model().forward(ids.clone()),
    );
    assert_eq!(diff, 0.0, "reloaded outputs");
    // And the adapter-aware model reads the same bundle.
    let mut reread = PeftModel::new(ours::Transformer::new(&device));
    reread.load_adapter(trained.path(), "default").unwrap();
    assert!(
        max_diff(
            fresh.model().forward(ids.clone()),
            reread.model().forward(ids)
        ) < 1e-5
    );
    // The config is PEFT's.
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(trained.path().join(bundle::CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
}

#[test]
fn merge_and_unmerge_round_trip() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    let (mut plain, mut ours) = pair(&device, lora(&TARGETS), dir.path());
    let ids = ids(&device);
    let adapted = plain.model().forward(ids.clone());
    let base_before = base_params(plain.model());

    plain.merge().unwrap();
    assert!(plain.is_merged());
    let merged_diff = max_diff(plain.model().forward(ids.clone()), adapted.clone());
    // The merged weights are the adapter-aware model's merged weights.
    ours.merge().unwrap();
    let merged_plain = base_params(plain.model());
    let merged_ours = base_params(ours.model());
    let weights_diff = merged_plain
        .iter()
        .map(|(k, v)| data_diff(v, &merged_ours[k]))
        .fold(0.0, f32::max);

    plain.unmerge().unwrap();
    assert!(!plain.is_merged());
    let unmerged = base_params(plain.model());
    let restore_diff = base_before
        .iter()
        .map(|(k, v)| data_diff(v, &unmerged[k]))
        .fold(0.0, f32::max);
    let unmerged_out = max_diff(plain.model().forward(ids.clone()), adapted.clone());

    let parameters = plain.trainable_report().all;
    let unloaded = plain.merge_and_unload().unwrap();
    let unloaded_diff = max_diff(unloaded.forward(ids), adapted);
    println!(
        "merged outputs {merged_diff:.2e}, merged weights vs PeftModel {weights_diff:.2e}, unmerged weights {restore_diff:.2e}, unmerged outputs {unmerged_out:.2e}, merge_and_unload outputs {unloaded_diff:.2e}"
    );
    for d in [
        merged_diff,
        weights_diff,
        restore_diff,
        unmerged_out,
        unloaded_diff,
    ] {
        assert!(d < 1e-5, "{d}");
    }
    // merge_and_unload leaves a plain model: no adapter parameters.
    assert!(unloaded.num_params() < parameters);
    assert_eq!(
        unloaded.num_params(),
        base_before
            .values()
            .map(|d| d.num_elements())
            .sum::<usize>()
    );
}

#[test]
fn named_adapters_switch_disable_and_delete() {
    let device = Device::flex();
    let ids = ids(&device);
    let base = plain::Transformer::new(&device).forward(ids.clone());
    let mut plain = PeftModule::new(plain::Transformer::new(&device));
    let mut ours = PeftModel::new(ours::Transformer::new(&device));
    let dir = tempfile::tempdir().unwrap();
    for (name, targets) in [("qv", &["q_proj", "v_proj"][..]), ("mlp", &["up_proj"][..])] {
        plain
            .add_adapter(name, method(lora(targets)).as_ref())
            .unwrap();
        plain.save_adapter(dir.path(), name).unwrap();
        ours.load_adapter_trainable(bundle::adapter_dir(dir.path(), name), name)
            .unwrap();
    }
    assert_eq!(plain.active_adapters(), ["qv"]);
    plain.set_adapters(&["qv", "mlp"]).unwrap();
    ours.set_adapters(&["qv", "mlp"]).unwrap();
    assert!(
        max_diff(
            plain.model().forward(ids.clone()),
            ours.model().forward(ids.clone())
        ) < 1e-5
    );
    plain.set_adapter("mlp").unwrap();
    ours.set_adapter("mlp").unwrap();
    assert!(
        max_diff(
            plain.model().forward(ids.clone()),
            ours.model().forward(ids.clone())
        ) < 1e-5
    );
    // Only the active adapter trains.
    let up = 2 * 4 * (HIDDEN + FFN);
    assert_eq!(plain.trainable_report().trainable, up);

    plain.disable_adapters().unwrap();
    assert_eq!(
        max_diff(plain.model().forward(ids.clone()), base.clone()),
        0.0
    );
    plain.enable_adapters().unwrap();
    plain.merge().unwrap();
    plain.delete_adapter("mlp").unwrap(); // unmerges first
    assert_eq!(plain.adapter_names(), ["qv"]);
    assert_eq!(plain.active_adapters(), ["qv"]);
    ours.delete_adapter("mlp").unwrap();
    ours.set_adapter("qv").unwrap();
    assert!(
        max_diff(
            plain.model().forward(ids.clone()),
            ours.model().forward(ids.clone())
        ) < 1e-5
    );
    let unloaded = plain.unload();
    assert!(max_diff(unloaded.forward(ids), base) < 1e-5);
}

#[test]
fn dora_on_plain_layers_matches_adapter_aware_layers_in_outputs_and_a_step() {
    let device = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let mut config = lora(&["q_proj", "v_proj", "down_proj", "embed_tokens"]);
    config["use_dora"] = json!(true);
    let (mut plain, mut ours) = pair(&device, config, dir.path());
    let ids = ids(&device);
    let diff = max_diff(
        plain.model().forward(ids.clone()),
        ours.model().forward(ids),
    );
    assert!(diff < 1e-5, "{diff}");
    train_step(&mut plain, &mut ours, &device);
    let step = assert_same_tensors(
        &plain.adapter_tensors("default").unwrap(),
        &ours.adapter_tensors("default").unwrap(),
        1e-5,
    );
    println!("DoRA: outputs {diff:.2e}, adapter after one step {step:.2e}");
}

#[test]
fn all_linear_takes_every_linear_layer_but_the_named_output_layer() {
    let device = Device::flex();
    let all_linear = method(json!({"peft_type": "LORA", "target_modules": "all-linear"}));
    let mut model = PeftModule::new(plain::Transformer::new(&device)).with_output_layer("lm_head");
    model.add_adapter("default", all_linear.as_ref()).unwrap();
    let adapted = model.adapted_layers("default");
    assert_eq!(adapted.len(), LAYERS * 6);
    assert!(!adapted.contains(&"lm_head".to_string()));
    // Without an output layer, PEFT's rule for models that are not transformers: every Linear.
    let mut model = PeftModule::new(plain::Transformer::new(&device));
    model.add_adapter("default", all_linear.as_ref()).unwrap();
    assert_eq!(model.adapted_layers("default").len(), LAYERS * 6 + 1);
    assert_eq!(model.adaptable_layers().len(), LAYERS * 6 + 2);
}

#[test]
fn targets_the_path_cannot_adapt_are_typed_errors() {
    let device = Device::flex();
    let model = || PeftModule::new(plain::Transformer::new(&device));
    let err = |config: serde_json::Value| {
        let mut m = model();
        let e = m
            .add_adapter("default", method(config).as_ref())
            .unwrap_err();
        // Nothing was attached.
        assert!(m.adapter_names().is_empty());
        assert_eq!(m.trainable_report().trainable, 0);
        e
    };
    match err(lora(&["q_proj", "q_porj"])) {
        PeftError::TargetNotFound { entry, closest, .. } => {
            assert_eq!(entry, "q_porj");
            assert!(closest.contains(&"q_proj".to_string()), "{closest:?}");
        }
        e => panic!("{e}"),
    }
    match err(lora(&["input_layernorm"])) {
        PeftError::UnsupportedSite { path, kind, method } => {
            assert_eq!(
                (path.as_str(), kind.as_str(), method.as_str()),
                ("layers.0.input_layernorm", "LayerNorm", "LORA")
            );
        }
        e => panic!("{e}"),
    }
    match err(lora(&["self_attn"])) {
        PeftError::UnsupportedSite { kind, .. } => assert_eq!(kind, "SelfAttention"),
        e => panic!("{e}"),
    }
    let mut dropout = lora(&["q_proj"]);
    dropout["lora_dropout"] = json!(0.1);
    let e = err(dropout);
    assert!(matches!(e, PeftError::NotSupportedByMethod { .. }), "{e}");
    assert!(e.to_string().contains("lora_dropout"), "{e}");
    let mut copies = lora(&["q_proj"]);
    copies["modules_to_save"] = json!(["lm_head"]);
    assert!(matches!(err(copies), PeftError::Unsupported { key, .. } if key == "modules_to_save"));
    let mut prefix = PeftModule::new(plain::Transformer::new(&device));
    let prefix_method = method(
        json!({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "task_type": "CAUSAL_LM"}),
    );
    assert!(matches!(
        prefix.add_adapter("default", prefix_method.as_ref()),
        Err(PeftError::Unsupported { .. })
    ));
    // A model already carrying Burn's own LoRA reparameterization.
    let burn_lora = plain::Transformer::new(&device).apply_lora(burn::module::Lora::new(2, 4.0));
    let e = PeftModule::new(burn_lora)
        .add_adapter("default", method(lora(&["q_proj"])).as_ref())
        .unwrap_err();
    assert!(
        matches!(e, PeftError::InvalidState(ref m) if m.contains("`lora`")),
        "{e}"
    );
}

#[test]
fn a_bundle_with_dropout_loads_for_inference_and_a_bad_bundle_changes_nothing() {
    let device = Device::flex();
    let dir = tempfile::tempdir().unwrap();
    // A bundle trained with lora_dropout (by PeftModel here; PEFT writes the same).
    let mut trained = PeftModel::new(ours::Transformer::new(&device));
    let mut config = lora(&["q_proj", "v_proj"]);
    config["lora_dropout"] = json!(0.1);
    trained
        .add_adapter("default", method(config).as_ref())
        .unwrap();
    trained.save_adapter(dir.path(), "default").unwrap();
    let mut plain = PeftModule::new(plain::Transformer::new(&device));
    plain.load_adapter(dir.path(), "default").unwrap();
    let ids = ids(&device);
    assert!(
        max_diff(
            plain.model().forward(ids.clone()),
            trained.model().forward(ids.clone())
        ) < 1e-5
    );

    // A bundle with a tensor of the wrong shape: typed error, model unchanged.
    let bad = tempfile::tempdir().unwrap();
    let mut tensors = trained.adapter_tensors("default").unwrap();
    tensors.insert(
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
        TensorData::new(vec![0f32; 3 * HIDDEN], [3, HIDDEN]),
    );
    std::fs::write(
        bad.path().join(bundle::WEIGHTS_FILE),
        bundle::encode_safetensors(&tensors).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        dir.path().join(bundle::CONFIG_FILE),
        bad.path().join(bundle::CONFIG_FILE),
    )
    .unwrap();
    let before = plain.model().forward(ids.clone());
    let e = plain.load_adapter(bad.path(), "other").unwrap_err();
    // The shared load rule checks the config's rank against the file before allocating, as for
    // PeftModel.
    assert!(
        matches!(&e, PeftError::InvalidConfig { key, .. } if key == "r"),
        "{e}"
    );
    assert_eq!(plain.adapter_names(), ["default"]);
    assert_eq!(max_diff(plain.model().forward(ids), before), 0.0);
}
