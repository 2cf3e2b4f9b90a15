//! Bad input never panics: token ids outside the vocabulary (too large or negative), sequences
//! longer than the position table, invalid config.json values, a `data.max_length` or
//! `--max-new-tokens` beyond the model's positions, in every model family. Each is exit code 2
//! with a message naming the input, the limit and what to do. Also: `all-linear` training
//! through `burn-peft train` on an untied Llama gives PEFT's bundle (no `lm_head` LoRA), and
//! `eval --predictions` writes one JSON line per example.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{Value, json};

mod common;

use common::{bad_input, burn_peft, fixtures, model_with_tokenizer, sentence, text};

/// int64 safetensors inputs.
fn write_inputs(file: &Path, tensors: &[(&str, Vec<i64>, [usize; 2])]) {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, v, s)| {
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (k.to_string(), bytes, s.to_vec())
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(k, b, s)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, s.clone(), b)
                .unwrap();
            (k.clone(), view)
        })
        .collect();
    std::fs::write(file, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn forward(model: &Path, inputs: &Path, out: &Path) -> Output {
    burn_peft()
        .args(["forward", "--model"])
        .arg(model)
        .arg("--inputs")
        .arg(inputs)
        .arg("--output")
        .arg(out)
        .output()
        .unwrap()
}

/// A model folder whose config.json has `key` set to `value`.
fn with_config(dir: &Path, name: &str, edits: &[(&str, Value)]) -> PathBuf {
    let to = dir.join(format!("{name}-edited"));
    std::fs::create_dir_all(&to).unwrap();
    let from = fixtures().join("models").join(name);
    std::fs::copy(from.join("model.safetensors"), to.join("model.safetensors")).unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("config.json")).unwrap()).unwrap();
    for (key, value) in edits {
        config[*key] = value.clone();
    }
    std::fs::write(to.join("config.json"), config.to_string()).unwrap();
    to
}

#[test]
fn forward_refuses_out_of_range_ids_long_sequences_and_bad_configs_in_every_family() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    // (family, head-count key, position limit)
    for (name, heads_key, positions) in [
        ("bert", "num_attention_heads", Some(64)),
        ("gpt2", "n_head", Some(64)),
        ("llama_gqa", "num_attention_heads", None),
    ] {
        let model = fixtures().join("models").join(name);
        let inputs = tmp.path().join(format!("{name}.safetensors"));

        // 1. An id at the vocabulary size (128).
        write_inputs(&inputs, &[("input_ids", vec![5, 9, 128, 3], [1, 4])]);
        bad_input(
            &forward(&model, &inputs, &out),
            &[
                "input_ids",
                "id 128 at row 0, position 2",
                "0..=127",
                "tokenizer",
            ],
        );
        // 2. A negative id.
        write_inputs(&inputs, &[("input_ids", vec![5, -1, 7, 3], [2, 2])]);
        bad_input(
            &forward(&model, &inputs, &out),
            &["input_ids", "id -1 at row 0, position 1"],
        );
        // 3. Longer than the position table (BERT, GPT-2); a mask of another shape (all).
        if let Some(limit) = positions {
            let n = limit + 1;
            write_inputs(&inputs, &[("input_ids", vec![5; n], [1, n])]);
            bad_input(
                &forward(&model, &inputs, &out),
                &[
                    &format!("{n} positions"),
                    &format!("{limit} positions"),
                    "truncate",
                ],
            );
        }
        write_inputs(
            &inputs,
            &[
                ("input_ids", vec![5, 9, 7], [1, 3]),
                ("attention_mask", vec![1, 1], [1, 2]),
            ],
        );
        bad_input(
            &forward(&model, &inputs, &out),
            &["attention_mask", "shape [1, 2]", "[1, 3]"],
        );
        // 4. num_attention_heads: 0 in config.json.
        write_inputs(&inputs, &[("input_ids", vec![5, 9, 7], [1, 3])]);
        let broken = with_config(tmp.path(), name, &[(heads_key, json!(0))]);
        bad_input(
            &forward(&broken, &inputs, &out),
            &["config.json", heads_key, "at least 1"],
        );
    }
}

#[test]
fn invalid_configs_are_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in.safetensors");
    write_inputs(&inputs, &[("input_ids", vec![5, 9, 7], [1, 3])]);
    let out = tmp.path().join("out.safetensors");
    type Case<'a> = (&'a str, Vec<(&'a str, Value)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "bert",
            vec![("num_attention_heads", json!(5))],
            vec!["hidden_size", "multiple of `num_attention_heads`"],
        ),
        (
            "bert",
            vec![("hidden_act", json!("mish"))],
            vec!["hidden_act", "\"mish\"", "implemented: gelu"],
        ),
        (
            "bert",
            vec![("position_embedding_type", json!("relative_key"))],
            vec!["position_embedding_type", "absolute"],
        ),
        (
            "gpt2",
            vec![("activation_function", json!("gelu_10"))],
            vec!["activation_function"],
        ),
        (
            "llama_gqa",
            vec![("num_key_value_heads", json!(3))],
            vec!["num_attention_heads", "multiple of `num_key_value_heads`"],
        ),
        (
            "llama_gqa",
            vec![("num_key_value_heads", json!(0))],
            vec!["num_key_value_heads", "at least 1"],
        ),
        (
            "qwen2",
            vec![
                ("use_sliding_window", json!(true)),
                ("sliding_window", json!(4)),
            ],
            vec!["use_sliding_window", "max_window_layers"],
        ),
        (
            "mistral",
            vec![("sliding_window", json!(-2))],
            vec!["sliding_window", "positive integer"],
        ),
        (
            "llama_gqa",
            vec![("vocab_size", json!(-5))],
            vec!["config.json", "vocab_size"],
        ),
        // Sizes the weights cannot back are refused before anything of that size is built.
        (
            "llama_gqa",
            vec![("num_hidden_layers", json!(1u64 << 40))],
            vec!["config.json", "does not belong to these weights"],
        ),
        (
            "bert",
            vec![("intermediate_size", json!(1u64 << 50))],
            vec!["config.json", "does not belong to these weights"],
        ),
    ];
    for (name, edits, needles) in cases {
        let broken = with_config(tmp.path(), name, &edits);
        bad_input(&forward(&broken, &inputs, &out), &needles);
        std::fs::remove_dir_all(&broken).unwrap();
    }
}

fn write_run(
    dir: &Path,
    model: &Path,
    task: &str,
    method: &str,
    max_length: usize,
    data: &str,
) -> PathBuf {
    std::fs::write(dir.join("train.jsonl"), data).unwrap();
    let yaml = format!(
        "model:\n  name_or_path: {}\n  task: {task}\n{method}\ndata:\n  train: train.jsonl\n  max_length: {max_length}\ntrain:\n  epochs: 1\n  max_steps: 3\n  batch_size: 4\n  learning_rate: 5.0e-2\n  schedule: constant\n  progress: false\noutput: out\n",
        model.display()
    );
    let file = dir.join("run.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

fn lm_data(rows: usize, len: usize) -> String {
    (0..rows)
        .map(|i| json!({"text": sentence(len, i)}).to_string() + "\n")
        .collect()
}

#[test]
fn train_refuses_a_max_length_beyond_the_position_table() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, task, limit, key) in [
        ("bert_cls", "classification", 64, "max_position_embeddings"),
        ("gpt2", "causal-lm", 64, "n_positions"),
    ] {
        let model = model_with_tokenizer(tmp.path(), name);
        let data: String = (0..8)
            .map(|i| {
                let label = ["a", "b", "c"][i % 3];
                json!({"text": sentence(10, i), "label": label}).to_string() + "\n"
            })
            .collect();
        let method = "method:\n  peft_type: LORA\n  r: 2\n  target_modules: all-linear";
        let run = write_run(tmp.path(), &model, task, method, 100, &data);
        let out = burn_peft().arg("train").arg(&run).output().unwrap();
        bad_input(
            &out,
            &[
                "data.max_length",
                "100 tokens",
                &format!("{limit} positions"),
                key,
                "at most 64",
            ],
        );
        // A prefix takes positions too: 60 tokens + 8 virtual tokens do not fit 64.
        let method = "method:\n  peft_type: PREFIX_TUNING\n  num_virtual_tokens: 8";
        let run = write_run(tmp.path(), &model, task, method, 60, &data);
        let out = burn_peft().arg("train").arg(&run).output().unwrap();
        bad_input(
            &out,
            &[
                "data.max_length",
                "prefix of 8 virtual tokens",
                "at most 56",
            ],
        );
    }
}

#[test]
fn generate_refuses_to_run_past_the_position_table_before_generating() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_with_tokenizer(tmp.path(), "gpt2");
    let out = burn_peft()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", &sentence(10, 1), "--max-new-tokens", "60"])
        .output()
        .unwrap();
    bad_input(
        &out,
        &[
            "--max-new-tokens 60",
            "the prompt has 10 tokens",
            "64 positions",
            "at most 54 new tokens",
        ],
    );
    let ok = burn_peft()
        .args(["generate", "--model"])
        .arg(&model)
        .args(["--prompt", &sentence(10, 1), "--max-new-tokens", "54"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", text(&ok));
}

fn safetensors_keys(file: &Path) -> Vec<String> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut keys: Vec<String> = st.names().into_iter().map(String::from).collect();
    keys.sort();
    keys
}

#[test]
fn train_all_linear_on_an_untied_llama_gives_peft_keys_and_eval_writes_predictions() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_with_tokenizer(tmp.path(), "llama_gqa");
    let method =
        "method:\n  peft_type: LORA\n  r: 4\n  lora_alpha: 8\n  target_modules: all-linear";
    let run = write_run(
        tmp.path(),
        &model,
        "causal-lm",
        method,
        16,
        &lm_data(12, 12),
    );
    let out = burn_peft().arg("train").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("trainable params: 4,096"),
        "{}",
        text(&out)
    );
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("all_linear.json")).unwrap())
            .unwrap();
    let case = reference["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "llama_gqa_lm")
        .unwrap();
    let mut want: Vec<String> = case["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    want.sort();
    let got = safetensors_keys(&tmp.path().join("out/adapter/adapter_model.safetensors"));
    assert_eq!(got, want);
    assert!(!got.iter().any(|k| k.contains("lm_head")));

    // Per-example results of the trained adapter.
    std::fs::write(tmp.path().join("eval.jsonl"), lm_data(5, 9)).unwrap();
    let predictions = tmp.path().join("pred.jsonl");
    let out = burn_peft()
        .args([
            "eval",
            "--task",
            "causal-lm",
            "--max-length",
            "16",
            "--model",
        ])
        .arg(&model)
        .arg("--adapter")
        .arg(tmp.path().join("out/adapter"))
        .arg("--data")
        .arg(tmp.path().join("eval.jsonl"))
        .arg("--predictions")
        .arg(&predictions)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<Value> = std::fs::read_to_string(&predictions)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    for (i, row) in lines.iter().enumerate() {
        assert_eq!(row["line"], i + 1);
        assert_eq!(row["tokens"], 8, "9 tokens give 8 next-token targets");
        let loss = row["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0);
        assert!((row["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6 * loss.exp());
    }
    // --max-length beyond GPT-2's table is refused like data.max_length.
    let gpt2 = model_with_tokenizer(tmp.path(), "gpt2");
    let out = burn_peft()
        .args([
            "eval",
            "--task",
            "causal-lm",
            "--max-length",
            "65",
            "--model",
        ])
        .arg(&gpt2)
        .arg("--data")
        .arg(tmp.path().join("eval.jsonl"))
        .output()
        .unwrap();
    bad_input(&out, &["--max-length", "65 tokens", "64 positions"]);
}

#[test]
fn eval_predictions_for_a_classifier_name_gold_predicted_and_probabilities() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_with_tokenizer(tmp.path(), "bert_cls");
    let labels = ["a", "b", "c"];
    let data: String = (0..7)
        .map(|i| {
            let label = labels[i % 3];
            json!({"text": sentence(8, i), "label": label}).to_string() + "\n"
        })
        .collect();
    std::fs::write(tmp.path().join("data.jsonl"), &data).unwrap();
    let map =
        json!({"id2label": {"0": "a", "1": "b", "2": "c"}, "label2id": {"a": 0, "b": 1, "c": 2}});
    std::fs::write(tmp.path().join("labels.json"), map.to_string()).unwrap();
    let predictions = tmp.path().join("pred.jsonl");
    let out = burn_peft()
        .args(["eval", "--max-length", "16", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(tmp.path().join("data.jsonl"))
        .arg("--labels")
        .arg(tmp.path().join("labels.json"))
        .arg("--predictions")
        .arg(&predictions)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let rows: Vec<Value> = std::fs::read_to_string(&predictions)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 7);
    let mut correct = 0;
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["line"], i + 1);
        assert_eq!(row["gold"], labels[i % 3]);
        let probs = row["probabilities"].as_object().unwrap();
        assert_eq!(probs.len(), 3);
        let total: f64 = probs.values().map(|p| p.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        let best = probs
            .iter()
            .max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap()))
            .unwrap()
            .0;
        assert_eq!(row["predicted"], best.as_str());
        let gold_p = probs[labels[i % 3]].as_f64().unwrap();
        assert!((row["loss"].as_f64().unwrap() + gold_p.ln()).abs() < 1e-4);
        correct += usize::from(row["correct"] == true);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let accuracy = correct as f64 / 7.0;
    assert!(
        stdout.contains(&format!("accuracy {:.4}", accuracy))
            || stdout.contains(&format!("{:.2}%", 100.0 * accuracy)),
        "{stdout}"
    );
}
