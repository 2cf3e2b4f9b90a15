//! Tests of the run config: parsing, lines and hints of errors, shipped configs, fuzzing.

use super::*;

/// Load `yaml` from a folder that holds the data files it may name (`d/train.jsonl`, ...):
/// a missing data file is an error of its own (`data.train`, its line).
fn parse(yaml: &str) -> Result<LoadedRun, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("d")).unwrap();
    for split in ["train", "eval", "test"] {
        std::fs::write(dir.path().join(format!("d/{split}.jsonl")), "{}\n").unwrap();
    }
    let file = dir.path().join("run.yaml");
    std::fs::write(&file, yaml).unwrap();
    load(&file)
}

const GOOD: &str = "model:\n  name_or_path: some/model\nmethod:\n  peft_type: LORA\n  r: 4\n  target_modules: [query]\ndata:\n  train: d/train.jsonl\n  max_length: 32\ntrain:\n  epochs: 1\noutput: out\n";

#[test]
fn parses_a_lora_run_and_resolves_paths() {
    let run = parse(GOOD).unwrap();
    let MethodChoice::Peft(methods) = &run.method else {
        panic!("expected a PEFT method")
    };
    let [(name, m)] = methods.as_slice() else {
        panic!("one method")
    };
    assert_eq!(name, "default");
    assert_eq!(peft_core::peft_type_of(m.as_ref()), "LORA");
    assert!(run.config.data.train.ends_with("d/train.jsonl"));
    assert!(run.config.data.train.is_absolute() || run.config.data.train.starts_with("/"));
    assert_eq!(run.config.train.epochs, 1);
    assert_eq!(run.config.data.reader().max_length, 32);
    assert_eq!(run.config.device, "flex");
}

#[test]
fn unknown_top_level_key_names_line_and_suggestion() {
    let e = parse(&GOOD.replace("train:\n  epochs", "trian:\n  epochs")).unwrap_err();
    assert_eq!(e.line, Some(10), "{e}");
    assert!(e.message.contains("did you mean `train`"), "{e}");
}

#[test]
fn unknown_nested_key_names_line_and_suggestion() {
    let e = parse(&GOOD.replace("epochs: 1", "epohcs: 1")).unwrap_err();
    assert_eq!(e.line, Some(11), "{e}");
    assert!(e.message.contains("did you mean `epochs`"), "{e}");
}

#[test]
fn unknown_method_key_names_line_and_suggestion() {
    let e = parse(&GOOD.replace("r: 4", "r: 4\n  lora_alfa: 8")).unwrap_err();
    assert_eq!(e.line, Some(6), "{e}");
    assert!(e.message.contains("did you mean `lora_alpha`"), "{e}");
}

#[test]
fn unknown_peft_type_lists_registered_methods() {
    let e = parse(&GOOD.replace("peft_type: LORA", "peft_type: LORRA")).unwrap_err();
    assert_eq!(e.line, Some(4), "{e}");
    assert!(
        e.message.contains("LORA") && e.message.contains("PREFIX_TUNING"),
        "{e}"
    );
}

#[test]
fn full_fine_tuning_and_bad_device() {
    let full = GOOD.replace(
        "method:\n  peft_type: LORA\n  r: 4\n  target_modules: [query]\n",
        "method: full\n",
    );
    assert!(matches!(parse(&full).unwrap().method, MethodChoice::Full));
    let e = parse(&format!("{GOOD}device: tpu\n")).unwrap_err();
    assert_eq!(e.line, Some(13), "{e}");
    assert!(e.message.contains("vulkan:N"), "{e}");
}

#[test]
fn device_and_dtype_keys() {
    let run = parse(&format!("{GOOD}device: vulkan:1\ndtype: bf16\n")).unwrap();
    assert_eq!(run.config.device, "vulkan:1");
    assert_eq!(run.config.dtype, BaseDType::BF16);
    assert_eq!(parse(GOOD).unwrap().config.dtype, BaseDType::F32);
    let e = parse(&format!("{GOOD}dtype: f8\n")).unwrap_err();
    assert_eq!(e.line, Some(13), "{e}");
    let full = GOOD.replace(
        "method:\n  peft_type: LORA\n  r: 4\n  target_modules: [query]\n",
        "method: full\n",
    );
    let e = parse(&format!("{full}dtype: f16\n")).unwrap_err();
    assert!(e.message.contains("full fine-tuning"), "{e}");
}

#[test]
fn every_shipped_example_config_parses() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let run = load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(run.config.data.train.is_file(), "{}", path.display());
            seen += 1;
        }
    }
    assert!(seen >= 5, "expected the five shipped configs, found {seen}");
}

#[test]
fn classification_runs_get_peft_task_defaults() {
    let run = parse(GOOD).unwrap();
    let MethodChoice::Peft(methods) = &run.method else {
        panic!("expected a PEFT method")
    };
    let json = method_to_json(methods[0].1.as_ref());
    assert_eq!(json["task_type"], "SEQ_CLS");
    // The heads `classifier` and `score` are PEFT's SEQ_CLS rule, applied by peft-core when the
    // adapter is added (tests/several_methods.rs checks the saved bundles).
    assert!(
        json["modules_to_save"].is_null(),
        "{}",
        json["modules_to_save"]
    );
}

/// Settings that break the update are refused at load with their line (issue 22).
#[test]
fn out_of_range_train_settings_name_line_and_key() {
    for (from, to, line, key) in [
        (
            "epochs: 1",
            "epochs: 1\n  learning_rate: .nan",
            12,
            "learning_rate",
        ),
        (
            "epochs: 1",
            "epochs: 1\n  learning_rate: -0.1",
            12,
            "learning_rate",
        ),
        (
            "epochs: 1",
            "epochs: 1\n  max_grad_norm: 0",
            12,
            "max_grad_norm",
        ),
        (
            "epochs: 1",
            "epochs: 1\n  adamw:\n    eps: 0",
            13,
            "adamw.eps",
        ),
        (
            "epochs: 1",
            "epochs: 1\n  adamw:\n    beta1: 1",
            13,
            "adamw.beta1",
        ),
        (
            "epochs: 1",
            "epochs: 1\n  early_stopping_patience: 0",
            12,
            "early_stopping_patience",
        ),
    ] {
        let e = parse(&GOOD.replace(from, to)).unwrap_err();
        assert_eq!(e.line, Some(line), "{key}: {e}");
        assert!(e.message.contains(key), "{key}: {e}");
    }
}

#[test]
fn bad_value_type_has_a_line() {
    let e = parse(&GOOD.replace("epochs: 1", "epochs: many")).unwrap_err();
    assert_eq!(e.line, Some(11), "{e}");
}

#[test]
fn several_methods_from_a_list_or_a_map_train_together() {
    let list = GOOD.replace(
        "method:\n  peft_type: LORA\n  r: 4\n  target_modules: [query]\n",
        "method:\n  - peft_type: LORA\n    r: 4\n    target_modules: [query]\n  - peft_type: PREFIX_TUNING\n    num_virtual_tokens: 8\n  - peft_type: LORA\n    r: 2\n    target_modules: [value]\n",
    );
    let run = parse(&list).unwrap();
    let MethodChoice::Peft(methods) = &run.method else {
        panic!("expected PEFT methods")
    };
    let names: Vec<&str> = methods.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["lora", "prefix_tuning", "lora_2"]);
    // Every block is SEQ_CLS; peft-core gives the heads to the first adapter added only (one
    // head trains), which tests/several_methods.rs checks in the saved bundles.
    for (_, method) in methods {
        assert_eq!(method_to_json(method.as_ref())["task_type"], "SEQ_CLS");
    }

    let map = GOOD.replace(
        "method:\n  peft_type: LORA\n  r: 4\n  target_modules: [query]\n",
        "methods:\n  sql:\n    peft_type: LORA\n    r: 4\n    target_modules: [query]\n  style:\n    peft_type: PREFIX_TUNING\n    num_virtual_tokens: 4\n",
    );
    let run = parse(&map).unwrap();
    let MethodChoice::Peft(methods) = &run.method else {
        panic!("expected PEFT methods")
    };
    let names: Vec<&str> = methods.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["sql", "style"]);

    let typo = map.replace("num_virtual_tokens: 4", "num_virtual_token: 4");
    let e = parse(&typo).unwrap_err();
    assert!(
        e.message.contains("in `methods`") && e.message.contains("num_virtual_tokens"),
        "{e}"
    );
    let both = format!("{GOOD}methods:\n  a:\n    peft_type: LORA\n");
    let e = parse(&both).unwrap_err();
    assert!(e.message.contains("not both"), "{e}");
    let none = GOOD.replace(
        "method:\n  peft_type: LORA\n  r: 4\n  target_modules: [query]\n",
        "",
    );
    assert!(
        parse(&none)
            .unwrap_err()
            .message
            .contains("missing `method`")
    );
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn shipped() -> Vec<String> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let mut texts: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        texts.sort();
        texts.push(GOOD.to_string());
        texts
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Random bytes and random edits of the shipped configs (byte flips, a line
        /// dropped or repeated, a value replaced) load or fail with a `ConfigError`.
        #[test]
        fn run_configs_never_panic(
            which in any::<usize>(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            line_edit in proptest::option::of((any::<usize>(), 0u8..3, "[ -~]{0,16}")),
            random in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
        ) {
            let texts = shipped();
            let mut bytes = texts[which % texts.len()].clone().into_bytes();
            for (at, b) in edits {
                let len = bytes.len();
                bytes[at % len] = b;
            }
            let mut text = String::from_utf8_lossy(&bytes).into_owned();
            if let Some((at, kind, value)) = line_edit {
                let mut lines: Vec<String> = text.lines().map(String::from).collect();
                let i = at % lines.len();
                match kind {
                    0 => { lines.remove(i); }
                    1 => { let l = lines[i].clone(); lines.insert(i, l); }
                    _ => {
                        if let Some((key, _)) = lines[i].split_once(':') {
                            lines[i] = format!("{key}: {value}");
                        }
                    }
                }
                text = lines.join("\n");
            }
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("run.yaml");
            match random {
                Some(raw) => std::fs::write(&file, raw).unwrap(),
                None => std::fs::write(&file, text).unwrap(),
            }
            let _ = load(&file);
        }
    }
}
