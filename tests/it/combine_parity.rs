//! Weighted combination of LoRA adapters (`add_weighted_adapter`) against PEFT, on the fixtures
//! of `tests/fixtures/gen/combine_tiny.py`: for every deterministic combination type, the
//! combined adapter's delta `scaling * B @ A` per module within 1e-4, its config (r, lora_alpha,
//! target_modules, modules_to_save, ...), the forward outputs with it active, PEFT's bundle
//! loaded here, and PEFT's refusals as typed errors. DARE is random: its configs are compared,
//! its masks are tested for determinism and statistics in `peft-lora`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use burn_peft::core::bundle;
use burn_peft::core::{CombinationType, CombineOptions, MajoritySignMethod, PeftError, PeftModel};
use burn_peft::lora::combine::{Matrix, clamp_factors};
use burn_peft::models::{HfModel, ModelInputs, Task, from_pretrained};
use serde_json::Value;

/// Parity bound on deltas and outputs (absolute).
const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("combine").join(case)
}

fn notes(case: &str) -> Value {
    let text = std::fs::read_to_string(case_dir(case).join("notes.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn read_ints(file: &Path, key: &str) -> Option<(Vec<i64>, Vec<usize>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(key).ok()?;
    let values = view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Some((values, view.shape().to_vec()))
}

fn inputs(model: &str, device: &Device) -> (ModelInputs, Vec<i64>) {
    let file = fixtures()
        .join("models")
        .join(model)
        .join("inputs.safetensors");
    let int = |key: &str| {
        read_ints(&file, key)
            .map(|(v, s)| Tensor::<2, Int>::from_data(TensorData::new(v, s), device))
    };
    (
        ModelInputs {
            input_ids: int("input_ids").unwrap(),
            attention_mask: int("attention_mask"),
            token_type_ids: int("token_type_ids"),
            pixel_values: None,
        },
        read_ints(&file, "attention_mask").unwrap().0,
    )
}

/// Base model + the case's input adapters.
fn load_case(case: &str) -> (PeftModel<HfModel>, Value) {
    let notes = notes(case);
    let model_name = notes["model"].as_str().unwrap();
    let device = Device::flex();
    let dir = fixtures().join("models").join(model_name);
    let pretrained = from_pretrained(dir.to_str().unwrap(), Task::Auto, &device).unwrap();
    let mut model = PeftModel::new(pretrained.model);
    for name in notes["adapters"].as_object().unwrap().keys() {
        model
            .load_adapter(case_dir(case).join("adapters").join(name), name)
            .unwrap_or_else(|e| panic!("{case}/{name}: {e}"));
    }
    (model, notes)
}

fn options(entry: &Value) -> CombineOptions {
    CombineOptions {
        combination_type: entry["combination_type"].as_str().unwrap().parse().unwrap(),
        density: entry["density"].as_f64(),
        majority_sign_method: entry["majority_sign_method"]
            .as_str()
            .map_or(MajoritySignMethod::Total, |s| s.parse().unwrap()),
        svd_rank: entry["svd_rank"].as_u64().map(|r| r as usize),
        svd_clamp: entry["svd_clamp"].as_f64(),
        ..Default::default()
    }
}

fn weighted(entry: &Value) -> Vec<(String, f64)> {
    let names = entry["adapters"].as_array().unwrap();
    let weights = entry["weights"].as_array().unwrap();
    names
        .iter()
        .zip(weights)
        .map(|(n, w)| (n.as_str().unwrap().to_string(), w.as_f64().unwrap()))
        .collect()
}

fn combine(
    model: &mut PeftModel<HfModel>,
    entry: &Value,
    name: &str,
    options: &CombineOptions,
) -> Result<(), PeftError> {
    let w = weighted(entry);
    let refs: Vec<(&str, f64)> = w.iter().map(|(n, w)| (n.as_str(), *w)).collect();
    model.add_weighted_adapter(&refs, name, options).map(|_| ())
}

/// LoRA factors per module path, in the file layout: (A `[r, in]`, B `[out, r]`).
fn factors(tensors: &BTreeMap<String, TensorData>) -> BTreeMap<String, (Matrix, Matrix)> {
    let mut out = BTreeMap::new();
    for (key, data) in tensors {
        let Some(rest) = key.strip_prefix(bundle::KEY_PREFIX) else {
            continue;
        };
        for (a_suffix, b_suffix) in [
            (".lora_A.weight", ".lora_B.weight"),
            (".lora_embedding_A", ".lora_embedding_B"),
        ] {
            if let Some(path) = rest.strip_suffix(a_suffix) {
                let b_key = format!("{}{path}{b_suffix}", bundle::KEY_PREFIX);
                let a = Matrix::from_data(data);
                let b = Matrix::from_data(&tensors[&b_key]);
                out.insert(path.to_string(), (a, b));
            }
        }
    }
    out
}

fn scaling(config: &Value) -> f64 {
    assert!(config["rank_pattern"].as_object().unwrap().is_empty());
    assert!(config["alpha_pattern"].as_object().unwrap().is_empty());
    let r = config["r"].as_f64().unwrap();
    let alpha = config["lora_alpha"].as_f64().unwrap();
    if config["use_rslora"].as_bool().unwrap() {
        alpha / r.sqrt()
    } else {
        alpha / r
    }
}

fn deltas(tensors: &BTreeMap<String, TensorData>, config: &Value) -> BTreeMap<String, Matrix> {
    let s = scaling(config);
    factors(tensors)
        .into_iter()
        .map(|(path, (a, b))| (path, b.matmul(&a).scaled(s)))
        .collect()
}

fn read_bundle(dir: &Path) -> (BTreeMap<String, TensorData>, Value) {
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(bundle::CONFIG_FILE)).unwrap())
            .unwrap();
    let bytes = std::fs::read(dir.join(bundle::WEIGHTS_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(key, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{key}");
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (key, TensorData::new(values, view.shape().to_vec()))
        })
        .collect();
    (tensors, config)
}

fn our_config(model: &PeftModel<HfModel>, name: &str) -> Value {
    bundle::method_to_json(model.adapter_config(name).unwrap())
}

/// Every key of PEFT's saved config (minus informational ones) has the same value in ours;
/// `target_modules` lists compare as sets (PEFT writes a Python set).
fn assert_same_config(ours: &Value, peft: &Value, what: &str) {
    let skip = ["base_model_name_or_path", "peft_version", "revision"];
    for (key, theirs) in peft.as_object().unwrap() {
        if skip.contains(&key.as_str()) {
            continue;
        }
        let mine = &ours[key];
        let same = match (key.as_str(), mine, theirs) {
            ("target_modules", Value::Array(a), Value::Array(b)) => {
                let set = |v: &Vec<Value>| {
                    v.iter()
                        .map(|e| e.as_str().unwrap().to_string())
                        .collect::<BTreeSet<_>>()
                };
                set(a) == set(b)
            }
            (_, Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            _ => mine == theirs,
        };
        assert!(same, "{what}: config `{key}` is {mine}, PEFT has {theirs}");
    }
}

fn logits(model: &PeftModel<HfModel>, model_name: &str) -> (Vec<f32>, Option<Vec<i64>>) {
    let device = Device::flex();
    let (inputs, mask) = inputs(model_name, &device);
    let out = model.model().forward(&inputs).unwrap();
    match (out.logits, out.class_logits) {
        (Some(l), _) => (l.into_data().try_to_vec::<f32>().unwrap(), Some(mask)),
        (None, Some(c)) => (c.into_data().try_to_vec::<f32>().unwrap(), None),
        _ => panic!("{model_name}: no logits"),
    }
}

/// Largest |difference| over valid positions (`mask` for per-token `[3, 7, vocab]` logits).
fn max_diff(ours: &[f32], theirs: &[f32], mask: Option<&[i64]>) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let per_pos = mask.map_or(1, |m| ours.len() / m.len());
    ours.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(i, _)| mask.is_none_or(|m| m[i / per_pos] == 1))
        .map(|(_, (a, b))| f64::from((a - b).abs()))
        .fold(0.0, f64::max)
}

fn expected_logits(case: &str, combo: &str) -> Option<Vec<f32>> {
    let file = case_dir(case).join("expected.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(&format!("{combo}.logits")).ok()?;
    Some(
        view.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
    )
}

/// The svd_clamp result depends on the SVD's sign convention (the quantile is taken over the
/// signed factor values), which LAPACK fixes one way and burn-linalg another. So the clamp is
/// checked on our unclamped factors with each singular component's sign aligned to PEFT's.
fn check_clamp_aligned(
    ours_plain: &BTreeMap<String, (Matrix, Matrix)>,
    peft: &BTreeMap<String, (Matrix, Matrix)>,
    quantile: f64,
    what: &str,
) -> f64 {
    let mut worst = 0.0f64;
    for (path, (pa, pb)) in peft {
        let (oa, ob) = &ours_plain[path];
        let mut a = oa.clone();
        let mut b = ob.clone();
        for i in 0..a.rows() {
            let dot: f64 = (0..a.cols())
                .map(|j| a.get(i, j) * pa.get(i, j))
                .sum::<f64>()
                + (0..b.rows())
                    .map(|j| b.get(j, i) * pb.get(j, i))
                    .sum::<f64>();
            if dot < 0.0 {
                for j in 0..a.cols() {
                    a.set(i, j, -a.get(i, j));
                }
                for j in 0..b.rows() {
                    b.set(j, i, -b.get(j, i));
                }
            }
        }
        clamp_factors(&mut a, &mut b, quantile);
        let diff = a.max_abs_diff(pa).max(b.max_abs_diff(pb));
        assert!(
            diff < TOL,
            "{what}: `{path}` clamped factors differ by {diff}"
        );
        worst = worst.max(diff);
    }
    worst
}

fn run_case(case: &str) {
    let (mut model, notes) = load_case(case);
    let model_name = notes["model"].as_str().unwrap().to_string();
    let mut report = Vec::new();
    for (combo, entry) in notes["combinations"].as_object().unwrap() {
        let opts = options(entry);
        combine(&mut model, entry, combo, &opts).unwrap_or_else(|e| panic!("{case}/{combo}: {e}"));
        let what = format!("{case}/{combo}");
        let peft_dir = case_dir(case).join("combined").join(combo);
        let peft_config: Value = serde_json::from_str(
            &std::fs::read_to_string(peft_dir.join(bundle::CONFIG_FILE)).unwrap(),
        )
        .unwrap();
        let ours_config = our_config(&model, combo);
        assert_same_config(&ours_config, &peft_config, &what);
        if !entry["weights_saved"].as_bool().unwrap() {
            report.push(format!(
                "{what}: config matches (random masks: no delta parity)"
            ));
            continue;
        }
        let (peft_tensors, _) = read_bundle(&peft_dir);
        let ours_tensors = model.adapter_tensors(combo).unwrap();
        let theirs = deltas(&peft_tensors, &peft_config);
        let mine = deltas(&ours_tensors, &ours_config);
        assert_eq!(
            mine.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{what}: adapted modules"
        );
        let worst = if let Some(q) = opts.svd_clamp {
            let plain_name = format!("{combo}_unclamped");
            let plain = CombineOptions {
                svd_clamp: None,
                ..opts.clone()
            };
            combine(&mut model, entry, &plain_name, &plain).unwrap();
            let ours_plain = factors(&model.adapter_tensors(&plain_name).unwrap());
            // Our clamp of our own factors is what add_weighted_adapter produced.
            for (path, (a, b)) in &ours_plain {
                let (mut a, mut b) = (a.clone(), b.clone());
                clamp_factors(&mut a, &mut b, q);
                let (ca, cb) = &factors(&ours_tensors)[path];
                assert!(a.max_abs_diff(ca) < 1e-6 && b.max_abs_diff(cb) < 1e-6);
            }
            check_clamp_aligned(&ours_plain, &factors(&peft_tensors), q, &what)
        } else {
            let mut worst = 0.0f64;
            for (path, d) in &mine {
                let diff = d.max_abs_diff(&theirs[path]);
                assert!(
                    diff < TOL,
                    "{what}: delta at `{path}` differs from PEFT's by {diff}"
                );
                worst = worst.max(diff);
            }
            worst
        };
        let mut line = format!("{what}: max |delta - PEFT| {worst:.2e}");
        if let Some(want) = expected_logits(case, combo) {
            model.set_adapter(combo).unwrap();
            let (got, mask) = logits(&model, &model_name);
            let d = max_diff(&got, &want, mask.as_deref());
            assert!(d < TOL, "{what}: logits differ from PEFT's by {d}");
            // PEFT -> us: PEFT's own bundle of the combination, loaded here.
            let loaded = format!("peft_{combo}");
            model.load_adapter(&peft_dir, &loaded).unwrap();
            model.set_adapter(&loaded).unwrap();
            let (got, _) = logits(&model, &model_name);
            let d2 = max_diff(&got, &want, mask.as_deref());
            assert!(
                d2 < TOL,
                "{what}: PEFT's bundle loaded here differs by {d2}"
            );
            line += &format!(", logits {d:.2e} (PEFT's bundle here: {d2:.2e})");
        }
        report.push(line);
    }
    for (name, entry) in notes["errors"].as_object().unwrap() {
        let field = match name.as_str() {
            "two_modules_to_save" => "modules_to_save",
            "regex_and_list" => "target_modules",
            _ => "r",
        };
        let before = model.adapter_names();
        match combine(&mut model, entry, name, &options(entry)) {
            Err(PeftError::IncompatibleAdapters {
                field: f, adapters, ..
            }) => {
                assert_eq!(f, field, "{case}/{name}");
                assert!(
                    adapters.len() >= 2,
                    "{case}/{name}: names the adapters at fault"
                );
            }
            other => {
                panic!("{case}/{name}: expected IncompatibleAdapters on `{field}`, got {other:?}")
            }
        }
        assert_eq!(
            model.adapter_names(),
            before,
            "{case}/{name}: nothing added"
        );
        report.push(format!("{case}/{name}: refused on `{field}` as PEFT does"));
    }
    for line in report {
        eprintln!("{line}");
    }
}

#[test]
fn llama_same_rank_every_type_matches_peft() {
    run_case("llama_same");
}

#[test]
fn llama_different_ranks_match_peft() {
    run_case("llama_ranks");
}

#[test]
fn gpt2_conv1d_layers_match_peft() {
    run_case("gpt2");
}

#[test]
fn bert_regex_targets_and_modules_to_save_match_peft() {
    run_case("bert_cls");
}

#[test]
fn our_combined_bundle_is_what_peft_loads() {
    // Save ours, read it back as PEFT would (config keys, tensor names and shapes), load it again
    // here and get the same outputs.
    let (mut model, notes) = load_case("llama_same");
    let entry = &notes["combinations"]["ties"];
    combine(&mut model, entry, "ours", &options(entry)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_adapter(dir.path(), "ours").unwrap();
    let (ours, ours_config) = read_bundle(&dir.path().join("ours"));
    let (peft, peft_config) = read_bundle(&case_dir("llama_same").join("combined/ties"));
    assert_same_config(&ours_config, &peft_config, "saved ties bundle");
    let shapes = |t: &BTreeMap<String, TensorData>| {
        t.iter()
            .map(|(k, v)| (k.clone(), v.shape().to_vec()))
            .collect::<Vec<_>>()
    };
    assert_eq!(shapes(&ours), shapes(&peft), "tensor names and shapes");
    model.set_adapter("ours").unwrap();
    let (before, mask) = logits(&model, "llama_gqa");
    model
        .load_adapter(dir.path().join("ours"), "reloaded")
        .unwrap();
    model.set_adapter("reloaded").unwrap();
    let (after, _) = logits(&model, "llama_gqa");
    assert!(max_diff(&before, &after, mask.as_deref()) < 1e-6);
}

#[test]
fn bad_combinations_are_typed_errors_that_change_nothing() {
    let (mut model, _) = load_case("llama_same");
    let before = model.adapter_names();
    let svd = CombineOptions::default();
    let err = model
        .add_weighted_adapter(&[("a", 1.0), ("nope", 1.0)], "m", &svd)
        .unwrap_err();
    assert!(
        matches!(err, PeftError::AdapterNotFound { ref name, .. } if name == "nope"),
        "{err}"
    );
    let err = model
        .add_weighted_adapter(&[("a", 1.0)], "b", &svd)
        .unwrap_err();
    assert!(matches!(err, PeftError::AdapterExists(_)), "{err}");
    let err = model
        .add_weighted_adapter(&[("a", f64::NAN), ("b", 1.0)], "m", &svd)
        .unwrap_err();
    assert!(err.to_string().contains("weights"), "{err}");
    let ties = CombineOptions::new(CombinationType::Ties);
    let err = model
        .add_weighted_adapter(&[("a", 1.0), ("b", 1.0)], "m", &ties)
        .unwrap_err();
    assert!(err.to_string().contains("density"), "{err}");
    for bad in [
        CombineOptions {
            density: Some(1.5),
            ..ties.clone()
        },
        CombineOptions {
            svd_clamp: Some(-0.1),
            ..svd.clone()
        },
        CombineOptions {
            svd_driver: Some("gesdd".into()),
            ..svd.clone()
        },
        CombineOptions {
            svd_rank: Some(0),
            ..svd.clone()
        },
        CombineOptions {
            density: Some(0.0),
            ..CombineOptions::new(CombinationType::DareLinear)
        },
    ] {
        let err = model
            .add_weighted_adapter(&[("a", 1.0), ("b", 1.0)], "m", &bad)
            .unwrap_err();
        assert!(
            matches!(err, PeftError::InvalidConfig { .. }),
            "{bad:?}: {err}"
        );
    }
    // A prefix-tuning adapter is not LoRA: refused whether it comes second (LoRA's rule) or
    // first (prefix tuning has no combination hook).
    model
        .load_adapter(fixtures().join("prefix/llama_gqa_table"), "p")
        .unwrap();
    let err = model
        .add_weighted_adapter(&[("a", 1.0), ("p", 1.0)], "m", &svd)
        .unwrap_err();
    assert!(
        matches!(err, PeftError::IncompatibleAdapters { ref field, .. } if field == "peft_type"),
        "{err}"
    );
    let err = model
        .add_weighted_adapter(&[("p", 1.0), ("a", 1.0)], "m", &svd)
        .unwrap_err();
    assert!(
        matches!(err, PeftError::NotSupportedByMethod { .. }),
        "{err}"
    );
    assert_eq!(
        model.adapter_names(),
        [before, vec!["p".to_string()]].concat()
    );
}
