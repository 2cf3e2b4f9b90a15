//! `LoraConfig`'s JSON against the files PEFT writes: every LoRA `adapter_config.json` of the
//! repository's fixtures reads and writes back byte for byte (the unsupported options, held in
//! one `UnsupportedOptions` field, keep their keys and values), a config built here has PEFT's
//! keys, and each unsupported option that is set is refused by its key.

use std::path::{Path, PathBuf};

use peft_core::bundle::{method_to_json, parse_config_value, render_config};
use peft_core::unsupported::{OptionPolicy, UnsupportedTable};
use peft_core::{PeftError, PeftMethod};
use peft_lora::{LoraConfig, LoraUnsupported};
use serde_json::{Value, json};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn lora_configs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            lora_configs(&path, out);
        } else if path.file_name().is_some_and(|n| n == "adapter_config.json") {
            let text = std::fs::read_to_string(&path).unwrap();
            if text.contains("\"peft_type\": \"LORA\"") {
                out.push(path);
            }
        }
    }
}

#[test]
fn peft_files_round_trip_byte_for_byte() {
    let mut files = Vec::new();
    lora_configs(&fixtures(), &mut files);
    assert!(files.len() > 10, "{} LoRA configs found", files.len());
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let method: Box<dyn PeftMethod> = serde_json::from_str(&text).unwrap();
        let written = render_config(&method_to_json(method.as_ref()));
        assert_eq!(written.trim_end(), text.trim_end(), "{}", file.display());
    }
}

#[test]
fn a_built_config_writes_peft_keys_and_defaults() {
    let fixture = fixtures().join("gguf/smollm2_lora/adapter_config.json");
    let peft: Value = serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let ours = method_to_json(
        &LoraConfig::new(2)
            .targets(["q_proj"])
            .task_type("CAUSAL_LM"),
    );
    let keys = |v: &Value| {
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(keys(&ours), keys(&peft));
    for option in LoraUnsupported::OPTIONS {
        assert_eq!(ours[option.key], peft[option.key], "{}", option.key);
    }
    // And nothing in a PEFT file is an unknown key.
    let loaded = parse_config_value(peft, None).unwrap();
    assert!(loaded.unknown_keys.is_empty(), "{:?}", loaded.unknown_keys);
}

#[test]
fn each_refused_option_is_refused_by_its_key_and_inert_ones_load() {
    let base = method_to_json(&LoraConfig::new(4));
    for option in LoraUnsupported::OPTIONS {
        let mut config = base.clone();
        let value = match option.default {
            "false" => json!(true),
            _ => json!({"set": 1}),
        };
        config[option.key] = value.clone();
        let result = parse_config_value(config, None);
        match option.policy {
            OptionPolicy::Inert => assert!(result.is_ok(), "{}: {result:?}", option.key),
            OptionPolicy::Refused => match result {
                Err(PeftError::Unsupported {
                    key, found, reason, ..
                }) => {
                    assert_eq!(key, option.key);
                    assert_eq!(found, value.to_string());
                    assert!(reason.contains(option.effect), "{reason}");
                }
                other => panic!("{}: expected Unsupported, got {other:?}", option.key),
            },
        }
    }
}

#[test]
fn unsupported_options_are_reachable_in_one_field() {
    let mut config = LoraConfig::new(4);
    assert_eq!(config.unsupported.get("use_qalora"), Some(&json!(false)));
    assert!(config.validate().is_ok());
    config.unsupported.set("use_qalora", json!(true)).unwrap();
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("use_qalora") && err.contains("PEFT"), "{err}");
    assert!(config.unsupported.set("use_dora", json!(true)).is_err());
}
