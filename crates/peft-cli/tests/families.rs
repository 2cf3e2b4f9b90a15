//! Each decoder family's fixture through the CLI, against transformers + PEFT: `forward` (base,
//! LoRA, LoRA merged on the fly, the LoRA as `adapter_model.bin`), `merge` to a folder that
//! loads alone and gives PEFT's merged logits, greedy `generate`, and `eval` per-example losses.
//! The fixtures are the tiny models of `tests/fixtures/gen/<family>_tiny.py` with a word-level
//! tokenizer (`w1` ... `w127`) for the text subcommands.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{burn_peft, fixtures, model_with_tokenizer, text};

type Tensors = HashMap<String, (Vec<f32>, Vec<usize>)>;

fn read(file: &Path) -> Tensors {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = match view.dtype() {
                safetensors::Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                _ => view
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
                    .collect(),
            };
            (name, (values, view.shape().to_vec()))
        })
        .collect()
}

/// Largest |difference| of per-token logits at the valid positions of the fixture batch.
fn diff_valid(ours: &[f32], theirs: &[f32], mask: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    let per_position = ours.len() / mask.len();
    ours.iter()
        .zip(theirs)
        .enumerate()
        .filter(|(i, _)| mask[i / per_position] == 1.0)
        .map(|(_, (a, b))| (a - b).abs())
        .fold(0.0, f32::max)
}

/// `burn-peft forward` of the fixture batch with `extra` arguments, compared with `key`.
fn forward(model: &Path, extra: &[&str], expected: &Path, key: &str, tmp: &Path) {
    let inputs = model.join("inputs.safetensors");
    let out = tmp.join("out.safetensors");
    let run = burn_peft()
        .arg("forward")
        .arg("--model")
        .arg(model)
        .arg("--inputs")
        .arg(&inputs)
        .arg("--output")
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    assert!(run.status.success(), "{extra:?}: {}", text(&run));
    let mask = &read(&inputs)["attention_mask"].0;
    let ours = &read(&out)["logits"].0;
    let theirs = &read(expected)[key].0;
    let diff = diff_valid(ours, theirs, mask);
    assert!(
        diff < 1e-4,
        "{}: {extra:?} `{key}` differs by {diff}",
        model.display()
    );
}

/// The fixture's valid token ids of each row.
fn rows(model: &Path) -> Vec<Vec<i64>> {
    let inputs = read(&model.join("inputs.safetensors"));
    let (ids, shape) = &inputs["input_ids"];
    let mask = &inputs["attention_mask"].0;
    (0..shape[0])
        .map(|r| {
            (0..shape[1])
                .filter(|&j| mask[r * shape[1] + j] == 1.0)
                .map(|j| ids[r * shape[1] + j] as i64)
                .collect()
        })
        .collect()
}

fn words(ids: &[i64]) -> String {
    ids.iter()
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Mean next-token loss of each row from PEFT's logits (`[b, s, vocab]`) at the valid
/// positions: what `eval --task causal-lm` reports per example.
fn reference_losses(logits: &(Vec<f32>, Vec<usize>), rows: &[Vec<i64>]) -> Vec<f64> {
    let (values, shape) = logits;
    let (s, v) = (shape[1], shape[2]);
    rows.iter()
        .enumerate()
        .map(|(r, ids)| {
            let nll: f64 = (0..ids.len() - 1)
                .map(|j| {
                    let at = &values[(r * s + j) * v..(r * s + j + 1) * v];
                    let max = at.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let sum: f64 = at.iter().map(|x| (*x as f64 - max).exp()).sum();
                    max + sum.ln() - at[ids[j + 1] as usize] as f64
                })
                .sum();
            nll / (ids.len() - 1) as f64
        })
        .collect()
}

/// The whole CLI on fixture `name` (a causal LM with `lora/`), saved as `class` by `merge`;
/// `bin` is the same LoRA as `adapter_model.bin` (with its `expected.safetensors`, or the
/// fixture's `lora/` one).
fn cli_family(name: &str, class: &str, bin: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = fixtures().join("models").join(name);
    let model = model_with_tokenizer(tmp.path(), name);
    std::fs::copy(
        fixture.join("inputs.safetensors"),
        model.join("inputs.safetensors"),
    )
    .unwrap();
    let lora = fixture.join("lora");
    let lora_arg = lora.to_str().unwrap();
    let lora_expected = lora.join("expected.safetensors");
    forward(
        &model,
        &[],
        &fixture.join("expected.safetensors"),
        "logits",
        tmp.path(),
    );
    forward(
        &model,
        &["--adapter", lora_arg],
        &lora_expected,
        "logits",
        tmp.path(),
    );
    forward(
        &model,
        &["--adapter", lora_arg, "--merge"],
        &lora_expected,
        "merged_logits",
        tmp.path(),
    );
    forward(
        &model,
        &["--adapter", bin.to_str().unwrap()],
        &lora_expected,
        "logits",
        tmp.path(),
    );

    // merge: a folder that loads alone (its config names the class) and gives PEFT's merge.
    let merged = tmp.path().join("merged");
    let run = burn_peft()
        .arg("merge")
        .arg("--model")
        .arg(&model)
        .arg("--adapter")
        .arg(&lora)
        .arg("--output")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        config["architectures"],
        serde_json::json!([class]),
        "{name}"
    );
    std::fs::copy(
        fixture.join("inputs.safetensors"),
        merged.join("inputs.safetensors"),
    )
    .unwrap();
    forward(&merged, &[], &lora_expected, "merged_logits", tmp.path());

    // generate: PEFT's greedy ids (up to an end-of-sequence token, where the CLI stops).
    let greedy: Vec<i64> = read(&lora_expected)["greedy_ids"]
        .0
        .iter()
        .map(|v| *v as i64)
        .collect();
    let eos: Vec<i64> = match &config["eos_token_id"] {
        serde_json::Value::Number(n) => n.as_i64().into_iter().collect(),
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_i64()).collect(),
        _ => Vec::new(),
    };
    let prompt = &greedy[..4];
    let end = greedy[4..]
        .iter()
        .position(|t| eos.contains(t))
        .map_or(greedy.len(), |p| 4 + p + 1);
    let run = burn_peft()
        .arg("generate")
        .arg("--model")
        .arg(&model)
        .args(["--adapter", lora_arg, "--prompt", &words(prompt)])
        .args(["--max-new-tokens", &(greedy.len() - 4).to_string()])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    let generated = String::from_utf8_lossy(&run.stdout);
    let want = greedy[..end]
        .iter()
        .map(|&i| {
            if i == 0 {
                "[PAD]".into()
            } else {
                format!("w{i}")
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(generated.trim(), want, "{name}: greedy generation");

    // eval: each fixture row's mean next-token loss is PEFT's.
    let rows = rows(&fixture);
    let data = tmp.path().join("rows.jsonl");
    let lines: Vec<String> = rows
        .iter()
        .map(|r| serde_json::json!({ "text": words(r) }).to_string())
        .collect();
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let predictions = tmp.path().join("predictions.jsonl");
    let run = burn_peft()
        .args(["eval", "--task", "causal-lm", "--model"])
        .arg(&model)
        .args(["--adapter", lora_arg, "--data"])
        .arg(&data)
        .arg("--predictions")
        .arg(&predictions)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run));
    let reference = reference_losses(&read(&lora_expected)["logits"], &rows);
    let ours: Vec<f64> = std::fs::read_to_string(&predictions)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(ours.len(), reference.len());
    for (row, (a, b)) in ours.iter().zip(&reference).enumerate() {
        assert!(
            (a - b).abs() < 1e-4,
            "{name}: row {row} loss {a} vs PEFT {b}"
        );
    }
}

#[test]
fn llama_through_the_cli() {
    let bin = fixtures().join("pickle/llama_gqa_lora");
    cli_family("llama_gqa", "LlamaForCausalLM", &bin);
}

#[test]
fn qwen3_through_the_cli() {
    let bin = fixtures().join("models/qwen3/lora_bin");
    cli_family("qwen3", "Qwen3ForCausalLM", &bin);
}

#[test]
fn gemma3_through_the_cli() {
    let bin = fixtures().join("models/gemma3/lora_bin");
    cli_family("gemma3", "Gemma3ForCausalLM", &bin);
}

#[test]
fn phi3_through_the_cli() {
    let bin = fixtures().join("models/phi3/lora_bin");
    cli_family("phi3", "Phi3ForCausalLM", &bin);
}
