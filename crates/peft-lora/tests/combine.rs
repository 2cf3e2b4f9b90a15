//! LoRA combination rules that the PEFT fixtures (tests/it/combine_parity.rs) cannot show: DARE's
//! randomness (seeded, kept fraction, exact rescaling), rank_pattern sites, `all-linear`,
//! targets no input covers, rollback.

use burn::module::Module;
use burn::tensor::{Device, TensorData};
use indexmap::IndexMap;
use peft_core::nn::{Linear, LinearConfig};
use peft_core::{
    Adaptable, CombinationType, CombineOptions, LayerIndices, LayersPattern, PeftError, PeftModel,
    TargetModules,
};
use peft_lora::LoraConfig;
use peft_lora::combine::{LoraFactors, MaskKey, Matrix, combine_factors};

#[derive(Module, Debug, Adaptable)]
struct Block {
    q: Linear,
    k: Linear,
    v: Linear,
}

#[derive(Module, Debug, Adaptable)]
struct Net {
    layers: Vec<Block>,
}

fn net() -> Net {
    let device = Device::flex();
    let layer = || Block {
        q: LinearConfig::new(16, 16).init(&device),
        k: LinearConfig::new(16, 8).init(&device),
        v: LinearConfig::new(16, 8).init(&device),
    };
    Net {
        layers: vec![layer(), layer()],
    }
}

/// A LoRA config with random A and B (`init_lora_weights = false`).
fn lora(r: usize, alpha: f64, targets: TargetModules) -> LoraConfig {
    LoraConfig {
        r,
        lora_alpha: alpha,
        target_modules: Some(targets),
        init_lora_weights: peft_lora::InitLoraWeights::Bool(false),
        ..Default::default()
    }
}

fn model_with(adapters: &[(&str, LoraConfig)]) -> PeftModel<Net> {
    let mut model = PeftModel::new(net());
    for (name, config) in adapters {
        model.add_adapter(name, config).unwrap();
    }
    model
}

fn tensors(model: &PeftModel<Net>, name: &str) -> Vec<(String, Vec<f32>)> {
    model
        .adapter_tensors(name)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.try_to_vec::<f32>().unwrap()))
        .collect()
}

/// `scaling * B @ A` of adapter `name` at `path`, file orientation `[out, in]`.
fn delta(model: &PeftModel<Net>, name: &str, path: &str) -> Matrix {
    let t = model.adapter_tensors(name).unwrap();
    let a = Matrix::from_data(&t[&format!("base_model.model.{path}.lora_A.weight")]);
    let b = Matrix::from_data(&t[&format!("base_model.model.{path}.lora_B.weight")]);
    let json = peft_core::bundle::method_to_json(model.adapter_config(name).unwrap());
    let config: LoraConfig = serde_json::from_value(json).unwrap();
    let (r, alpha) = config.rank_and_alpha(path).unwrap();
    b.matmul(&a).scaled(config.scaling_for(r, alpha))
}

fn options(kind: CombinationType, density: Option<f64>, seed: u64) -> CombineOptions {
    CombineOptions {
        combination_type: kind,
        density,
        seed,
        ..Default::default()
    }
}

#[test]
fn dare_is_deterministic_under_a_seed() {
    let targets = TargetModules::list(["q", "v"]);
    let mut model = model_with(&[
        ("a", lora(4, 8.0, targets.clone())),
        ("b", lora(4, 4.0, targets)),
    ]);
    let inputs = [("a", 0.6), ("b", 0.4)];
    for kind in [
        CombinationType::DareLinear,
        CombinationType::DareTies,
        CombinationType::DareLinearSvd,
        CombinationType::DareTiesSvd,
    ] {
        let name = |s: &str| format!("{kind}_{s}");
        for (suffix, seed) in [("one", 7), ("again", 7), ("other", 8)] {
            model
                .add_weighted_adapter(&inputs, &name(suffix), &options(kind, Some(0.5), seed))
                .unwrap();
        }
        let strip = |name: &str| {
            tensors(&model, name)
                .into_iter()
                .map(|(_, v)| v)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            strip(&name("one")),
            strip(&name("again")),
            "{kind}: same seed"
        );
        assert_ne!(
            strip(&name("one")),
            strip(&name("other")),
            "{kind}: other seed"
        );
    }
}

fn single(a: Matrix, b: Matrix) -> LoraFactors {
    LoraFactors {
        name: "x".into(),
        weight: 1.0,
        scaling: 1.0,
        a,
        b,
    }
}

fn spread(rows: usize, cols: usize, phase: f64) -> Matrix {
    Matrix::new(
        rows,
        cols,
        (0..rows * cols)
            .map(|i| ((i as f64) * 0.618 + phase).sin() + 1.5)
            .collect(),
    )
}

#[test]
fn dare_keeps_density_of_the_values_and_rescales_them_exactly() {
    // One input with weight * scaling = 1: each side gets weight 1, so every entry of the
    // result is either 0 or the input entry / density (DARE's rescaling), nothing else.
    let (rows, cols) = (16, 8192);
    let a = spread(rows, cols, 0.0);
    let b = spread(cols, rows, 1.0);
    for (kind, density) in [
        (CombinationType::DareLinear, 0.3),
        (CombinationType::DareTies, 0.7),
    ] {
        let key = MaskKey {
            seed: 42,
            module: "layers.0.q",
        };
        let opts = options(kind, Some(density), 42);
        let inputs = [single(a.clone(), b.clone())];
        let (na, nb) = combine_factors(&inputs, rows, &opts, key).unwrap();
        for (new, old) in [(&na, &a), (&nb, &b)] {
            let n = old.values().len();
            let mut kept = 0usize;
            for (x, v) in new.values().iter().zip(old.values()) {
                if *x != 0.0 {
                    assert_eq!(
                        *x,
                        v / density,
                        "{kind}: kept values are rescaled by 1/density"
                    );
                    kept += 1;
                }
            }
            let fraction = kept as f64 / n as f64;
            // Binomial(n, density): 5 standard deviations (n = 131072: about 0.006).
            let bound = 5.0 * (density * (1.0 - density) / n as f64).sqrt();
            assert!(
                (fraction - density).abs() < bound,
                "{kind}: kept {fraction}, density {density}, bound {bound}"
            );
        }
        // A and B get independent masks.
        let mask = |m: &Matrix| m.values().iter().map(|v| *v != 0.0).collect::<Vec<_>>();
        assert_ne!(mask(&na), mask(&nb.transpose()));
    }
}

#[test]
fn density_one_keeps_everything_as_peft() {
    let a = spread(4, 64, 0.0);
    let b = spread(64, 4, 2.0);
    let inputs = [single(a.clone(), b.clone())];
    let key = MaskKey {
        seed: 1,
        module: "m",
    };
    let (na, nb) = combine_factors(
        &inputs,
        4,
        &options(CombinationType::DareLinear, Some(1.0), 1),
        key,
    )
    .unwrap();
    assert_eq!((na, nb), (a, b));
}

#[test]
fn rank_pattern_sites_are_padded_or_refused() {
    let targets = TargetModules::list(["q", "k"]);
    let with_pattern = |k_rank: usize| LoraConfig {
        rank_pattern: IndexMap::from([("k".to_string(), k_rank)]),
        ..lora(4, 4.0, targets.clone())
    };
    // Same pattern: at `k` both have rank 2, below the combined rank 4: zero-padded, and the
    // linear rule's delta is there (PEFT would leave a rank-2 tensor under r = 4).
    let mut model = model_with(&[("a", with_pattern(2)), ("b", with_pattern(2))]);
    let linear = CombineOptions::new(CombinationType::Linear);
    model
        .add_weighted_adapter(&[("a", 1.0), ("b", 1.0)], "lin", &linear)
        .unwrap();
    let t = model.adapter_tensors("lin").unwrap();
    assert_eq!(
        t["base_model.model.layers.0.k.lora_A.weight"]
            .shape()
            .to_vec(),
        vec![4, 16]
    );
    let saved = tempfile::tempdir().unwrap();
    model.save_adapter(saved.path(), "lin").unwrap();
    let mut reloaded = PeftModel::new(net());
    reloaded
        .load_adapter(saved.path().join("lin"), "lin")
        .unwrap();
    // Different patterns: equal declared ranks, but `k` differs at the site.
    let mut model = model_with(&[("a", with_pattern(2)), ("b", with_pattern(3))]);
    let err = model
        .add_weighted_adapter(&[("a", 1.0), ("b", 1.0)], "lin", &linear)
        .unwrap_err();
    match err {
        PeftError::IncompatibleAdapters { field, reason, .. } => {
            assert_eq!(field, "r");
            assert!(reason.contains("layers.0.k"), "{reason}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(model.adapter_names(), ["a", "b"], "rolled back");
    // `cat` takes any ranks (8 = 4 + 4 here, 2 + 3 at `k`, zero-padded) and is exact.
    let cat = CombineOptions::new(CombinationType::Cat);
    model
        .add_weighted_adapter(&[("a", 0.5), ("b", -1.0)], "cat", &cat)
        .unwrap();
    let want = {
        let da = delta(&model, "a", "layers.1.k");
        let db = delta(&model, "b", "layers.1.k");
        let values = da
            .values()
            .iter()
            .zip(db.values())
            .map(|(x, y)| 0.5 * x - y)
            .collect();
        Matrix::new(da.rows(), da.cols(), values)
    };
    assert!(delta(&model, "cat", "layers.1.k").max_abs_diff(&want) < 1e-5);
}

#[test]
fn all_linear_becomes_the_attached_module_names() {
    let mut model = model_with(&[
        ("a", lora(2, 2.0, TargetModules::Regex("all-linear".into()))),
        ("b", lora(2, 2.0, TargetModules::list(["q"]))),
    ]);
    model
        .add_weighted_adapter(&[("b", 1.0), ("a", 1.0)], "mix", &CombineOptions::default())
        .unwrap();
    let targets = model
        .adapter_config("mix")
        .unwrap()
        .targets()
        .target_modules;
    assert_eq!(targets, Some(TargetModules::list(["q", "k", "v"])));
}

#[test]
fn a_target_no_input_covers_is_an_error_and_nothing_changes() {
    // `a` (first: its layers_to_transform = None is inherited) on q, `b` on v of layer 1 only:
    // the union {q, v} reaches layers.0.v, where no input is.
    let b = LoraConfig {
        layers_to_transform: Some(LayerIndices::Many(vec![1])),
        layers_pattern: Some(LayersPattern::One("layers".into())),
        ..lora(2, 2.0, TargetModules::list(["v"]))
    };
    let mut model = model_with(&[("a", lora(2, 2.0, TargetModules::list(["q"]))), ("b", b)]);
    let before = tensors(&model, "a");
    let err = model
        .add_weighted_adapter(&[("a", 1.0), ("b", 1.0)], "mix", &CombineOptions::default())
        .unwrap_err();
    match &err {
        PeftError::IncompatibleAdapters { field, reason, .. } => {
            assert_eq!(field, "target_modules");
            assert!(reason.contains("layers.0.v"), "{reason}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(model.adapter_names(), ["a", "b"]);
    assert_eq!(tensors(&model, "a"), before);
    // Merged adapters stay merged through the rollback.
    model.merge().unwrap();
    assert!(
        model
            .add_weighted_adapter(&[("a", 1.0), ("b", 1.0)], "mix", &CombineOptions::default())
            .is_err()
    );
    let w = model.model().layers[0].q.weight.val().into_data();
    model.unmerge().unwrap();
    assert_ne!(w, model.model().layers[0].q.weight.val().into_data());
}

#[test]
fn one_adapter_combines_linearly_and_negative_weights_subtract() {
    let mut model = model_with(&[("a", lora(4, 8.0, TargetModules::list(["q"])))]);
    // PEFT turns any type into `linear` for a single adapter; `ties` would need a density.
    let ties = CombineOptions::new(CombinationType::Ties);
    model
        .add_weighted_adapter(&[("a", -0.5)], "neg", &ties)
        .unwrap();
    let want = delta(&model, "a", "layers.0.q").scaled(-0.5);
    assert!(delta(&model, "neg", "layers.0.q").max_abs_diff(&want) < 1e-5);
    let config = model.adapter_config("neg").unwrap();
    let json = peft_core::bundle::method_to_json(config);
    assert_eq!(
        (json["r"].as_u64(), json["lora_alpha"].as_u64()),
        (Some(4), Some(4))
    );
    assert!(
        !model.active_adapters().contains(&"neg".to_string()),
        "added inactive"
    );
}

#[test]
fn svd_rank_above_a_module_size_is_zero_padded() {
    // v is 16 -> 8: rank 12 exceeds min(in, out) = 8. PEFT's full_matrices=True breaks here;
    // the result is the exact delta, padded with zero components.
    let targets = TargetModules::list(["v"]);
    let mut model = model_with(&[
        ("a", lora(4, 4.0, targets.clone())),
        ("b", lora(4, 4.0, targets)),
    ]);
    let opts = CombineOptions {
        svd_rank: Some(12),
        ..Default::default()
    };
    model
        .add_weighted_adapter(&[("a", 1.0), ("b", 1.0)], "wide", &opts)
        .unwrap();
    let want = {
        let (da, db) = (
            delta(&model, "a", "layers.0.v"),
            delta(&model, "b", "layers.0.v"),
        );
        let values = da
            .values()
            .iter()
            .zip(db.values())
            .map(|(x, y)| x + y)
            .collect();
        Matrix::new(da.rows(), da.cols(), values)
    };
    assert!(delta(&model, "wide", "layers.0.v").max_abs_diff(&want) < 1e-5);
    let data: &TensorData =
        &model.adapter_tensors("wide").unwrap()["base_model.model.layers.0.v.lora_B.weight"];
    assert_eq!(data.shape().to_vec(), vec![8, 12]);
}
