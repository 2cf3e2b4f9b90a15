//! Chat templates (`peft_models::chat`) against transformers' `apply_chat_template`
//! (`tests/fixtures/gen/chat_templates.py`, `tests/fixtures/chat/cases.json`): the published
//! templates of SmolLM2, Qwen2.5, Qwen3, Llama 3.2, Gemma 3 and Phi-3.5 render the same text
//! for 50 conversations (system prompts, several turns, tools, reasoning, thinking switches,
//! non-ASCII and whitespace), the real SmolLM2 tokenizer gives the same ids, a template with
//! `{% generation %}` blocks gives the same assistant-token mask, and `raise_exception` is a
//! typed error naming the message.

use std::path::Path;

use peft_models::ModelError;
use peft_models::chat::{ChatMessage, ChatTemplate, RenderOptions, encode_chat};
use serde_json::{Map, Value};

use crate::gguf_models::smollm2;

fn cases() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat/cases.json");
    let text = std::fs::read_to_string(&path).expect("cases.json");
    let all: Value = serde_json::from_str(&text).expect("cases.json parses");
    all["cases"].as_array().expect("cases").clone()
}

fn template(case: &Value) -> ChatTemplate {
    let name = case["template"].as_str().expect("template");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/chat/templates")
        .join(format!("{name}.jinja"));
    let source = std::fs::read_to_string(&path).expect("template file");
    let mut tokens: Vec<(String, String)> = Vec::new();
    if let Some(map) = case["special_tokens"].as_object() {
        for (k, v) in map {
            tokens.push((k.clone(), v.as_str().expect("token").to_string()));
        }
    } else {
        for key in ["bos_token", "eos_token"] {
            if let Some(t) = case[key].as_str() {
                tokens.push((key.to_string(), t.to_string()));
            }
        }
    }
    ChatTemplate::new(path.display().to_string(), &source, tokens).expect("template compiles")
}

fn options(case: &Value) -> RenderOptions {
    let mut variables: Map<String, Value> = case["kwargs"].as_object().cloned().unwrap_or_default();
    if let Some(tools) = case.get("tools") {
        variables.insert("tools".into(), tools.clone());
    }
    RenderOptions {
        add_generation_prompt: case["add_generation_prompt"].as_bool().expect("flag"),
        variables,
    }
}

fn messages(case: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(case["messages"].clone()).expect("messages")
}

/// `Today Date: 07 Dec 2026` with the date left out, for the case rendered with the
/// generator's clock.
fn without_date(text: &str) -> String {
    regex::Regex::new(r"Today Date: \d\d \w{3} \d{4}")
        .expect("regex")
        .replace_all(text, "Today Date: <date>")
        .into_owned()
}

#[test]
fn published_templates_render_as_transformers_renders_them() {
    let mut checked = 0;
    for case in cases().iter().filter(|c| c.get("text").is_some()) {
        let name = case["name"].as_str().unwrap_or_default();
        let rendered = template(case)
            .render_with(&messages(case), &options(case))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = case["text"].as_str().expect("text");
        if case["dynamic_date"].as_bool() == Some(true) {
            assert_eq!(
                without_date(&rendered.text),
                without_date(expected),
                "{name}"
            );
            let today = chrono::Local::now().format("%d %b %Y").to_string();
            assert!(rendered.text.contains(&today), "{name}: strftime_now");
        } else {
            assert_eq!(rendered.text, expected, "{name}");
        }
        checked += 1;
    }
    assert!(checked >= 45, "only {checked} cases");
}

#[test]
fn smollm2_token_ids_and_assistant_mask_match_transformers() {
    let file = smollm2();
    let gguf = peft_models::gguf::GgufFile::open(&file).expect("gguf");
    let tokenizer = peft_models::gguf::tokenizer_from_gguf(&gguf).expect("tokenizer");
    let mut checked = 0;
    for case in cases().iter().filter(|c| c.get("ids").is_some()) {
        let name = case["name"].as_str().unwrap_or_default();
        let template = template(case);
        let encoding = encode_chat(&template, &tokenizer, &messages(case), &options(case), None)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let ids: Vec<i64> = serde_json::from_value(case["ids"].clone()).expect("ids");
        assert_eq!(encoding.ids, ids, "{name}");
        if let Some(mask) = case.get("assistant_masks") {
            let mask: Vec<u8> = serde_json::from_value(mask.clone()).expect("mask");
            let ours: Vec<u8> = encoding
                .assistant_mask
                .iter()
                .map(|&m| u8::from(m))
                .collect();
            assert_eq!(ours, mask, "{name}: assistant mask");
            assert!(template.has_generation_blocks());
        }
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} cases");
}

/// Without generation blocks, the turn-by-turn rule marks the assistant's reply and its
/// end-of-turn tokens, not its role header; with them, transformers' mask: on SmolLM2 both
/// give the same tokens but for the straddling newline before the reply.
#[test]
fn turn_by_turn_mask_covers_replies_and_end_of_turn() {
    let file = smollm2();
    let gguf = peft_models::gguf::GgufFile::open(&file).expect("gguf");
    let tokenizer = peft_models::gguf::tokenizer_from_gguf(&gguf).expect("tokenizer");
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "smollm2_multi_turn")
        .expect("case");
    let encoding = encode_chat(
        &template(&case),
        &tokenizer,
        &messages(&case),
        &options(&case),
        None,
    )
    .expect("encodes");
    let masked: Vec<u32> = encoding
        .ids
        .iter()
        .zip(&encoding.assistant_mask)
        .filter(|(_, m)| **m)
        .map(|(id, _)| *id as u32)
        .collect();
    let decoded = tokenizer.inner().decode(&masked, false).expect("decodes");
    let replies: Vec<String> = messages(&case)
        .iter()
        .filter(|m| m.role == "assistant")
        .map(|m| m.text().expect("text"))
        .collect();
    for reply in &replies {
        assert!(
            decoded.contains(reply.trim()),
            "{decoded:?} lacks {reply:?}"
        );
    }
    assert_eq!(
        decoded.matches("<|im_end|>").count(),
        replies.len(),
        "{decoded:?}"
    );
    assert!(!decoded.contains("assistant\n"), "{decoded:?}");
}

#[test]
fn raise_exception_is_a_typed_error_naming_the_message() {
    let mut checked = 0;
    for case in cases().iter().filter(|c| c.get("error").is_some()) {
        let name = case["name"].as_str().unwrap_or_default();
        let err = template(case)
            .render_with(&messages(case), &options(case))
            .expect_err(name);
        match err {
            ModelError::ChatTemplate {
                template,
                message,
                reason,
            } => {
                assert!(template.ends_with("gemma3.jinja"), "{template}");
                assert_eq!(reason, case["error"].as_str().expect("error"), "{name}");
                assert_eq!(
                    message,
                    Some(1),
                    "{name}: the second message breaks the rule"
                );
            }
            e => panic!("{name}: {e}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 2);
}

/// A conversation over the limit is cut in its longest user message, keeping every turn and
/// the assistant's reply whole.
#[test]
fn truncation_keeps_the_template_structure() {
    let file = smollm2();
    let gguf = peft_models::gguf::GgufFile::open(&file).expect("gguf");
    let tokenizer = peft_models::gguf::tokenizer_from_gguf(&gguf).expect("tokenizer");
    let case = cases()
        .into_iter()
        .find(|c| c["name"] == "smollm2_system_user")
        .expect("case");
    let template = template(&case);
    let long = "word ".repeat(400);
    let conversation = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", long),
        ChatMessage::new("assistant", "Fine."),
    ];
    let full = encode_chat(
        &template,
        &tokenizer,
        &conversation,
        &RenderOptions::default(),
        None,
    )
    .expect("encodes");
    let cut = encode_chat(
        &template,
        &tokenizer,
        &conversation,
        &RenderOptions::default(),
        Some(64),
    )
    .expect("encodes");
    assert!(full.ids.len() > 400 && !full.truncated);
    assert!(cut.ids.len() <= 64 && cut.truncated, "{}", cut.ids.len());
    let text = tokenizer.decode(&cut.ids).unwrap_or_default();
    let raw = tokenizer
        .inner()
        .decode(
            &cut.ids.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            false,
        )
        .expect("decodes");
    assert!(
        text.contains("Be brief.") && text.ends_with("Fine.\n"),
        "{text:?}"
    );
    assert_eq!(raw.matches("<|im_start|>").count(), 3, "{raw:?}");
    let trained = cut.assistant_mask.iter().filter(|&&m| m).count();
    assert_eq!(trained, full.assistant_mask.iter().filter(|&&m| m).count());
}
