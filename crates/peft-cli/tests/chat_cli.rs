//! Chat on the command line with the real SmolLM2-135M-Instruct (`scripts/fetch-smollm2.sh`):
//! `generate --chat` answers as transformers' greedy `generate(apply_chat_template(...))` does
//! (`tests/fixtures/chat/smollm2_replies.json`), `eval` scores conversations by their generated
//! replies, `train` fine-tunes on conversations and scores a conversational test set before
//! and after, and bad conversations are exit-2 errors naming the file and line.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn reference() -> Value {
    let file = fixtures().join("chat/smollm2_replies.json");
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

/// The first `n` rows of the shipped chat demo's `split`.
fn chat_rows(dir: &Path, split: &str, n: usize) -> std::path::PathBuf {
    let text =
        std::fs::read_to_string(fixtures().join(format!("../../examples/data/chat/{split}.jsonl")))
            .unwrap();
    let rows: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
    let file = dir.join(format!("{split}.jsonl"));
    std::fs::write(&file, rows).unwrap();
    file
}

#[test]
fn generate_chat_answers_as_transformers_does() {
    let model = smollm2();
    for case in reference()["cases"].as_array().unwrap() {
        let messages = case["messages"].as_array().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("messages.json");
        std::fs::write(&file, Value::Array(messages.clone()).to_string()).unwrap();
        let out = burn_peft()
            .args(["generate", "--chat", "--max-new-tokens", "24", "--model"])
            .arg(&model)
            .arg("--messages")
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let reply = String::from_utf8(out.stdout).unwrap();
        assert_eq!(reply.strip_suffix('\n'), case["reply"].as_str(), "{case}");
    }
    // The same conversation from --user.
    let first = &reference()["cases"][0];
    let out = burn_peft()
        .args(["generate", "--chat", "--max-new-tokens", "24", "--model"])
        .arg(&model)
        .arg("--user")
        .arg(first["messages"][0]["content"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim_end(),
        first["reply"].as_str().unwrap()
    );
}

#[test]
fn chat_errors_are_exit_2_and_say_what_to_do() {
    let model = smollm2();
    let dir = tempfile::tempdir().unwrap();
    // A template's own exception: SmolLM2's has none, so an unknown role in a messages file.
    let file = dir.path().join("bad.json");
    std::fs::write(&file, r#"[{"role": "narrator", "content": "hi"}]"#).unwrap();
    let out = burn_peft()
        .args(["generate", "--chat", "--model"])
        .arg(&model)
        .arg("--messages")
        .arg(&file)
        .output()
        .unwrap();
    bad_input(&out, &["bad.json", "unknown role `narrator`"]);
    // A model without a chat template.
    let plain = model_with_tokenizer(dir.path(), "llama_gqa");
    let out = burn_peft()
        .args(["generate", "--chat", "--user", "hi", "--model"])
        .arg(&plain)
        .output()
        .unwrap();
    bad_input(&out, &["no chat template", "--prompt"]);
    // A conversation in the data without an assistant turn, by line.
    let data = dir.path().join("eval.jsonl");
    std::fs::write(
        &data,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n",
    )
    .unwrap();
    let out = burn_peft()
        .args(["eval", "--task", "causal-lm", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    bad_input(&out, &["eval.jsonl:2", "no assistant turn"]);
    // `data.chat_template` that does not compile: the file and the template's error.
    let template = dir.path().join("broken.jinja");
    std::fs::write(&template, "{% for m in messages %}").unwrap();
    let config = dir.path().join("chat.yaml");
    std::fs::write(
        &config,
        format!(
            "model:\n  name_or_path: {}\n  task: causal-lm\nmethod:\n  peft_type: LORA\n  \
             task_type: CAUSAL_LM\n  target_modules: [q_proj]\ndata:\n  train: {}\n  \
             chat_template: broken.jinja\noutput: out\n",
            model.display(),
            data.display()
        ),
    )
    .unwrap();
    let out = burn_peft().arg("train").arg(&config).output().unwrap();
    bad_input(&out, &["chat template", "broken.jinja"]);
    assert!(
        !dir.path().join("out").exists(),
        "a refused run writes nothing"
    );
}

#[test]
fn train_and_eval_on_conversations() {
    let model = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let train = chat_rows(dir.path(), "train", 8);
    let test = chat_rows(dir.path(), "test", 4);
    let config = dir.path().join("chat.yaml");
    std::fs::write(
        &config,
        format!(
            "model:\n  name_or_path: {}\n  task: causal-lm\nmethod:\n  peft_type: LORA\n  \
             task_type: CAUSAL_LM\n  r: 4\n  target_modules: [q_proj, v_proj]\ndata:\n  train: {}\n  \
             test: {}\n  max_length: 256\n  max_new_tokens: 4\n  packing: true\ntrain:\n  epochs: 1\n  \
             batch_size: 4\n  learning_rate: 1.0e-3\noutput: {}\n",
            model.display(),
            train.display(),
            test.display(),
            dir.path().join("out").display()
        ),
    )
    .unwrap();
    let out = burn_peft()
        .arg("train")
        .arg(&config)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // Eight conversations of about a hundred tokens packed into rows of 256.
    let packed = text(&out)
        .lines()
        .find_map(|l| {
            l.strip_prefix("packing: 8 training examples in ")?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .unwrap_or_else(|| panic!("no packing line:\n{}", text(&out)));
    assert!((2..8).contains(&packed), "{packed} rows");
    assert!(
        text(&out).contains("held-out generation (4 conversations"),
        "{}",
        text(&out)
    );
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("out/results.json")).unwrap(),
    )
    .unwrap();
    let generation = &results["test_generation"];
    assert_eq!(generation["conversations"], 4, "{results}");
    for when in ["before", "after"] {
        let exact = generation[when]["exact_match"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&exact), "{generation}");
    }
    // The template the conversations were rendered with is saved with the adapter.
    let saved =
        std::fs::read_to_string(dir.path().join("out/adapter/chat_template.jinja")).unwrap();
    let own = std::fs::read_to_string(fixtures().join("chat/templates/smollm2.jinja")).unwrap();
    assert_eq!(saved, own);
    let predictions =
        std::fs::read_to_string(dir.path().join("out/test_predictions.jsonl")).unwrap();
    assert_eq!(predictions.lines().count(), 4);

    // `eval` scores the same conversations with the trained adapter, one line per reply (the
    // task read from the adapter's `task_type`: no `--task` needed).
    let file = dir.path().join("predictions.jsonl");
    let out = burn_peft()
        .args(["eval", "--max-new-tokens", "4", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(dir.path().join("out/adapter"))
        .arg("--data")
        .arg(&test)
        .arg("--predictions")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("(4 conversations): exact match"),
        "{printed}"
    );
    let rows: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 4);
    for row in &rows {
        assert!(
            row["reference"].is_string() && row["reply"].is_string(),
            "{row}"
        );
        assert!(
            row["exact"].is_boolean() && row["contains"].is_boolean(),
            "{row}"
        );
    }
    // The replies of `eval` are the ones the run scored after training.
    let scored: Vec<Value> = predictions
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (a, b) in rows.iter().zip(&scored) {
        assert_eq!(a["reply"], b["reply"]);
    }
}
