//! Property tests of every parser of user files: random bytes and random mutations of valid
//! files never panic, they load or fail with a typed error. Covers the safetensors header
//! readers (adapter bundles, model weights), `adapter_config.json`, `config.json` (parsed, then
//! the model built and loaded) and the JSONL / CSV data reader. The YAML run config is fuzzed in
//! the CLI crate (`crates/peft-cli/src/config.rs`).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use burn_peft::core::bundle::{self, TensorFile};
use burn_peft::models::{HfConfig, HfTokenizer, Task, from_pretrained};
use burn_peft::train::data::{DataConfig, TaskKind, load_examples};
use proptest::prelude::*;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Byte edits and an optional cut applied to a valid file.
fn mutations() -> impl Strategy<Value = (Vec<(usize, u8)>, Option<usize>)> {
    (
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        proptest::option::of(any::<usize>()),
    )
}

fn mutate(base: &[u8], (edits, cut): &(Vec<(usize, u8)>, Option<usize>)) -> Vec<u8> {
    let mut bytes = base.to_vec();
    if bytes.is_empty() {
        return bytes;
    }
    for (at, b) in edits {
        // Most edits hit the header, where the structure is.
        let len = bytes.len().min(512);
        bytes[at % len] = *b;
    }
    if let Some(cut) = cut {
        bytes.truncate(cut % (base.len() + 1));
    }
    bytes
}

/// Any JSON value, small.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![Just(0i64), Just(-1), Just(1), Just(3), Just(1 << 40)].prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        "[a-z_]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::from),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A valid JSON object with some keys replaced by random values, some removed, some added.
fn mutate_json(base: &Value, edits: &[(usize, Option<Value>)]) -> Value {
    let mut obj = base.as_object().cloned().unwrap_or_default();
    let keys: Vec<String> = obj.keys().cloned().collect();
    for (i, (at, value)) in edits.iter().enumerate() {
        let key = &keys[at % keys.len()];
        match value {
            Some(v) if i % 5 == 4 => {
                obj.insert(format!("extra_{i}"), v.clone());
            }
            Some(v) => {
                obj.insert(key.clone(), v.clone());
            }
            None => {
                obj.remove(key);
            }
        }
    }
    Value::Object(obj)
}

fn json_edits() -> impl Strategy<Value = Vec<(usize, Option<Value>)>> {
    proptest::collection::vec((any::<usize>(), proptest::option::of(json_value())), 1..5)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn safetensors_reader_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = TensorFile::from_bytes(&bytes, Path::new("fuzz.safetensors"));
    }

    #[test]
    fn safetensors_reader_never_panics_on_mutated_bundles(m in mutations()) {
        let base = std::fs::read(fixtures().join("lora_tiny/main/adapter_model.safetensors")).unwrap();
        let bytes = mutate(&base, &m);
        let _ = TensorFile::from_bytes(&bytes, Path::new("fuzz.safetensors"));
        // The header-only reader of model weights sees the same bytes.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, &bytes).unwrap();
        let _ = burn_peft::models::load::tensor_names(&[file]);
    }

    #[test]
    fn adapter_config_never_panics_on_random_text(text in "\\PC{0,200}") {
        let _ = bundle::parse_config(&text, Path::new("adapter_config.json"));
    }

    #[test]
    fn adapter_config_never_panics_on_mutated_configs(which in 0usize..3, edits in json_edits()) {
        let file = [
            "lora_tiny/main/adapter_config.json",
            "lora_tiny/multi/second/adapter_config.json",
            "prefix/gpt2_mlp/adapter_config.json",
        ][which];
        let config = mutate_json(&read_json(&fixtures().join(file)), &edits);
        if let Ok(loaded) = bundle::parse_config(&config.to_string(), Path::new("adapter_config.json")) {
            // A config that parses validates and describes itself without panicking.
            let _ = loaded.method.validate();
            let _ = bundle::method_to_json(loaded.method.as_ref());
        }
    }

    #[test]
    fn model_config_never_panics_on_random_text(text in "\\PC{0,200}") {
        if let Ok(value) = serde_json::from_str::<Value>(&text) {
            let _ = HfConfig::from_value(value, Path::new("config.json"));
        }
    }

    #[test]
    fn mutated_model_configs_load_or_fail_cleanly(which in 0usize..4, edits in json_edits()) {
        let name = ["bert", "gpt2", "llama_gqa", "mistral"][which];
        let source = fixtures().join("models").join(name);
        let config = mutate_json(&read_json(&source.join("config.json")), &edits);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        std::fs::copy(source.join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
        // Parsing, building the model and loading the weights: each may refuse, none may panic.
        let _ = from_pretrained(dir.path().to_str().unwrap(), Task::Auto, &Device::flex());
    }

    #[test]
    fn mutated_model_weights_load_or_fail_cleanly(which in 0usize..3, m in mutations()) {
        let name = ["bert", "gpt2", "llama_gqa"][which];
        let source = fixtures().join("models").join(name);
        let base = std::fs::read(source.join("model.safetensors")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(source.join("config.json"), dir.path().join("config.json")).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), mutate(&base, &m)).unwrap();
        let _ = from_pretrained(dir.path().to_str().unwrap(), Task::Auto, &Device::flex());
    }
}

fn tokenizer() -> HfTokenizer {
    HfTokenizer::from_dir(&fixtures().join("tokenizers/gpt2_style")).unwrap()
}

const JSONL: &str = "{\"text\": \"a small image viewer\", \"label\": \"graphics\"}\n{\"text\": \"a mail client\", \"text_pair\": \"with filters\", \"label\": \"mail\"}\n{\"prompt\": \"viewer:\", \"completion\": \" shows images\"}\n";
const CHAT: &str = "{\"messages\": [{\"role\": \"system\", \"content\": \"be brief\"}, {\"role\": \"user\", \"content\": \"a viewer?\"}, {\"role\": \"assistant\", \"content\": \"graphics\"}]}\n{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"mail\"}]}, {\"role\": \"assistant\", \"content\": \"net\", \"reasoning_content\": \"x\"}]}\n";
const CSV: &str = "text,label\n\"a small, fast viewer\",graphics\na mail client,mail\n";

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn data_reader_never_panics(
        csv in any::<bool>(),
        causal in any::<bool>(),
        random in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
        m in mutations(),
        max_length in 0usize..40,
    ) {
        let base = if csv { CSV } else { JSONL };
        let bytes = random.unwrap_or_else(|| mutate(base.as_bytes(), &m));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(if csv { "data.csv" } else { "data.jsonl" });
        std::fs::write(&file, &bytes).unwrap();
        let cfg = DataConfig { max_length, ..DataConfig::default() };
        let kind = if causal { TaskKind::CausalLm } else { TaskKind::Classification };
        let _ = load_examples(&file, kind, &cfg, &tokenizer(), None, None);
    }

    /// Conversations, mutated: rows, roles, contents and lengths a chat template renders,
    /// never a panic.
    #[test]
    fn conversation_reader_never_panics(
        m in mutations(),
        max_length in 0usize..64,
        assistant_only in any::<bool>(),
    ) {
        let bytes = mutate(CHAT.as_bytes(), &m);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("chat.jsonl");
        std::fs::write(&file, &bytes).unwrap();
        let cfg = DataConfig { max_length, assistant_only_loss: assistant_only, ..DataConfig::default() };
        let template = peft_models::chat::ChatTemplate::new(
            "fuzz",
            "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}\
             {% if add_generation_prompt %}<|assistant|>{% endif %}",
            [("eos_token", "</s>")],
        )
        .unwrap();
        let _ = load_examples(&file, TaskKind::CausalLm, &cfg, &tokenizer(), Some(&template), None);
    }
}
