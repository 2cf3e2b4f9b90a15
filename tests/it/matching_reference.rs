//! Target matching against PEFT 0.21.2's own matcher: `tests/fixtures/lora_tiny/matching.json`
//! holds, for 44 module keys, what `check_target_module_exists` and `get_pattern_key` decided.

use burn_peft::core::matching::{TargetMatcher, pattern_lookup, select_targets};
use burn_peft::core::{LayerIndices, LayersPattern, PeftError, TargetModules, TargetSpec};
use serde_json::Value;

fn reference() -> Value {
    let text = std::fs::read_to_string(crate::common::fixtures().join("matching.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn spec(config: &Value) -> TargetSpec {
    let parse = |key: &str| -> Option<TargetModules> {
        (!config[key].is_null()).then(|| serde_json::from_value(config[key].clone()).unwrap())
    };
    TargetSpec {
        target_modules: parse("target_modules"),
        exclude_modules: parse("exclude_modules"),
        layers_to_transform: (!config["layers_to_transform"].is_null()).then(|| {
            serde_json::from_value::<LayerIndices>(config["layers_to_transform"].clone()).unwrap()
        }),
        layers_pattern: (!config["layers_pattern"].is_null()).then(|| {
            serde_json::from_value::<LayersPattern>(config["layers_pattern"].clone()).unwrap()
        }),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_peft_matching_case_agrees() {
    let reference = reference();
    let keys = strings(&reference["keys"]);
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 25, "the fixture should hold the full table");
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let config = &case["config"];
        let modules_to_save: Vec<String> = match &config["modules_to_save"] {
            Value::Null => vec![],
            v => strings(v),
        };
        let matcher = TargetMatcher::new(&spec(config), &[]).unwrap();
        let shielded = |k: &str| {
            burn_peft::core::matching::shielded_by_modules_to_save(&modules_to_save, k).unwrap()
        };
        let ours: Vec<String> = keys
            .iter()
            .filter(|k| !shielded(k) && matcher.is_target(k))
            .cloned()
            .collect();
        assert_eq!(ours, strings(&case["matched"]), "case `{name}`");
        for key in strings(&case["excluded"]) {
            assert!(
                matcher.is_excluded(&key) || shielded(&key),
                "case `{name}`: PEFT excluded `{key}`"
            );
        }
    }
}

#[test]
fn every_peft_rank_and_alpha_pattern_case_agrees() {
    let reference = reference();
    for case in reference["pattern_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let ranks: Vec<(String, usize)> = case["rank_pattern"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap() as usize))
            .collect();
        let alphas: Vec<(String, f64)> = case["alpha_pattern"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
            .collect();
        let r = case["r"].as_u64().unwrap() as usize;
        let alpha = case["lora_alpha"].as_f64().unwrap();
        for (key, want) in case["expected"].as_object().unwrap() {
            let got_r = pattern_lookup("rank_pattern", &ranks, key)
                .unwrap()
                .copied()
                .unwrap_or(r);
            let got_a = pattern_lookup("alpha_pattern", &alphas, key)
                .unwrap()
                .copied()
                .unwrap_or(alpha);
            assert_eq!(
                got_r as u64,
                want[0].as_u64().unwrap(),
                "case `{name}`, rank of `{key}`"
            );
            assert_eq!(
                got_a,
                want[1].as_f64().unwrap(),
                "case `{name}`, alpha of `{key}`"
            );
        }
    }
}

#[test]
fn all_linear_leaves_out_the_output_layer_like_peft() {
    let reference = reference();
    for case in reference["all_linear_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let linear: Vec<String> = case["modules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m[1] == "Linear")
            .map(|m| m[0].as_str().unwrap().to_string())
            .collect();
        let excluded: Vec<String> = match name {
            "llama_causal_lm" => vec!["lm_head".into()],
            "llama_seq_cls" => vec!["score".into()],
            _ => vec![],
        };
        let names = burn_peft::core::matching::all_linear_names(&linear, &excluded);
        let spec = TargetSpec {
            target_modules: Some(TargetModules::Regex("all-linear".into())),
            ..Default::default()
        };
        let ours = select_targets(&spec, &linear, &names, &|_| false).unwrap();
        let theirs = strings(&case["matched"]);
        assert_eq!(ours, theirs, "case `{name}`");
    }
}

#[test]
fn list_entry_matching_nothing_is_an_error_with_closest_names() {
    let paths: Vec<String> = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]
    .map(String::from)
    .to_vec();
    let spec = TargetSpec {
        target_modules: Some(TargetModules::list(["q_proj", "v_prj"])),
        ..Default::default()
    };
    match select_targets(&spec, &paths, &[], &|_| false) {
        Err(PeftError::TargetNotFound { entry, closest, .. }) => {
            assert_eq!(entry, "v_prj");
            assert_eq!(closest.first().map(String::as_str), Some("v_proj"));
        }
        other => panic!("expected TargetNotFound, got {other:?}"),
    }
    let regex = TargetSpec {
        target_modules: Some(TargetModules::Regex(".*\\.o_proj".into())),
        ..Default::default()
    };
    assert!(matches!(
        select_targets(&regex, &paths, &[], &|_| false),
        Err(PeftError::TargetNotFound { .. })
    ));
}

#[test]
fn invalid_combinations_are_rejected_like_peft() {
    let regex_with_layers = TargetSpec {
        target_modules: Some(TargetModules::Regex(".*q_proj".into())),
        layers_to_transform: Some(LayerIndices::One(0)),
        ..Default::default()
    };
    assert!(matches!(
        TargetMatcher::new(&regex_with_layers, &[]),
        Err(PeftError::InvalidConfig { key, .. }) if key == "layers_to_transform"
    ));
    let pattern_alone = TargetSpec {
        target_modules: Some(TargetModules::list(["q_proj"])),
        layers_pattern: Some(LayersPattern::One("layers".into())),
        ..Default::default()
    };
    assert!(matches!(
        TargetMatcher::new(&pattern_alone, &[]),
        Err(PeftError::InvalidConfig { key, .. }) if key == "layers_pattern"
    ));
    let bad_regex = TargetSpec {
        target_modules: Some(TargetModules::Regex("(".into())),
        ..Default::default()
    };
    assert!(matches!(
        TargetMatcher::new(&bad_regex, &[]),
        Err(PeftError::InvalidConfig { key, .. }) if key == "target_modules"
    ));
}
