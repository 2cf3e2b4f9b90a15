//! Truncation matches transformers' `tokenizer(text[, pair], truncation=True, max_length=N)`
//! (`tests/fixtures/gen/truncation.py`): special tokens are kept and the text is cut, the longer
//! part of a pair first. Real BERT tokenizer (all-MiniLM-L6-v2, from the Hugging Face cache),
//! transformers' GPT-2 and Llama tokenizer classes on long real texts.

use std::path::{Path, PathBuf};

use burn_peft::models::{HfTokenizer, model_dir};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("truncation.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tokenizer(name: &str) -> HfTokenizer {
    let dir = match name {
        // SAFETY: set before any other thread of this test binary reads the environment.
        "bert" => {
            unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
            model_dir("sentence-transformers/all-MiniLM-L6-v2")
                .expect("run scripts/fetch-minilm.sh first (the README's test command does)")
        }
        other => fixtures().join(other),
    };
    HfTokenizer::from_dir(&dir).unwrap()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn truncation_matches_transformers_for_bert_gpt2_and_llama_tokenizers() {
    let reference = reference();
    let texts: Vec<&str> = reference["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for (name, entry) in reference["tokenizers"].as_object().unwrap() {
        let tok = tokenizer(name);
        let cases = entry["cases"].as_array().unwrap();
        assert!(cases.len() >= 60, "{name}: too few cases");
        for case in cases {
            let text = texts[case["text"].as_u64().unwrap() as usize];
            let pair = case
                .get("pair")
                .map(|p| texts[p.as_u64().unwrap() as usize]);
            let max = case["max_length"].as_u64().unwrap() as usize;
            let enc = tok.encode(text, pair, max).unwrap();
            let what = format!(
                "{name}, text {}, pair {:?}, max {max}",
                case["text"],
                case.get("pair")
            );
            assert_eq!(enc.ids, ints(&case["input_ids"]), "{what}: input_ids");
            assert_eq!(
                enc.type_ids,
                ints(&case["token_type_ids"]),
                "{what}: token_type_ids"
            );
            assert!(enc.ids.len() <= max, "{what}: too long");
        }
    }
}

#[test]
fn a_long_bert_text_keeps_its_final_sep() {
    let tok = tokenizer("bert");
    let sep = tok.token_to_id("[SEP]").unwrap() as i64;
    let cls = tok.token_to_id("[CLS]").unwrap() as i64;
    let long = "word ".repeat(500);
    let enc = tok.encode(&long, None, 64).unwrap();
    assert_eq!(enc.ids.len(), 64);
    assert_eq!(enc.ids[0], cls);
    assert_eq!(*enc.ids.last().unwrap(), sep);
    let pair = tok.encode(&long, Some("short pair"), 64).unwrap();
    assert_eq!(pair.ids.len(), 64);
    assert_eq!(pair.ids.iter().filter(|&&i| i == sep).count(), 2);
}

#[test]
fn a_max_length_below_the_special_tokens_is_an_error() {
    let tok = tokenizer("bert");
    let err = tok.encode("hello world", None, 1).unwrap_err().to_string();
    assert!(
        err.contains("max length 1") && err.contains("2 special tokens"),
        "{err}"
    );
    assert_eq!(tok.num_special_tokens(false), 2);
    assert_eq!(tok.num_special_tokens(true), 3);
}
