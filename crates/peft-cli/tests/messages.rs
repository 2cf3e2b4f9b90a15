//! The CLI as a new user meets it: every message points at the real mistake (the file, the
//! key and its line, what was found, what to do; exit 2), and the subcommands follow one set of
//! rules (paths printed normalized, `--output` enough without `output:`, the task and the data
//! settings an adapter was trained with reused by `eval`, one length rule for `generate` and
//! `serve`). One test per row of the issue that found them, on the real all-MiniLM-L6-v2 and
//! the tiny fixture models.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;

const MINILM: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// A MiniLM classification run over 48 / 16 rows of the demo data, without `output:`; with
/// `method` as given.
fn run_dir(method: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let demo = fixtures().join("../../examples/data");
    for (split, n) in [("train.jsonl", 48), ("eval.jsonl", 16)] {
        let text = std::fs::read_to_string(demo.join(split)).unwrap();
        let rows: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
        std::fs::write(dir.path().join(split), rows).unwrap();
    }
    let config = dir.path().join("run.yaml");
    std::fs::write(
        &config,
        format!(
            "model:\n  name_or_path: {MINILM}\n  task: seq_cls\n{method}\ndata:\n  train: \
             train.jsonl\n  eval: eval.jsonl\n  max_length: 32\ntrain:\n  epochs: 1\n  \
             batch_size: 8\n  progress: false\n"
        ),
    )
    .unwrap();
    (dir, config)
}

const LORA: &str = "method:\n  peft_type: lora\n  r: 4\n  target_modules: [query, value]";

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A trained adapter (48 rows, 6 steps) and its run folder.
fn trained(dir: &Path, config: &Path) -> PathBuf {
    let out = burn_peft()
        .arg("train")
        .arg(config)
        .arg("--output")
        .arg(dir.join("runs/../out"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    dir.join("out")
}

#[test]
fn output_flag_is_enough_and_paths_are_normalized() {
    let (dir, config) = run_dir(LORA);
    // Without `output:` and without --output: what to add.
    let out = burn_peft().arg("train").arg(&config).output().unwrap();
    bad_input(&out, &["run.yaml", "no output folder", "--output"]);
    // PEFT's spellings (`lora`, `seq_cls`) are accepted; `--output` with `..` is printed and
    // recorded normalized and absolute.
    let run = trained(dir.path(), &config);
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    let result_dir = results["result_dir"].as_str().unwrap();
    assert!(Path::new(result_dir).is_absolute(), "{result_dir}");
    assert!(!result_dir.contains(".."), "{result_dir}");
    assert!(results["config"].as_str().unwrap().ends_with("run.yaml"));
    // Steps per second count the steps only, not evaluation and checkpoints.
    let steps = results["step_seconds"].as_f64().unwrap();
    let total = results["train_seconds"].as_f64().unwrap();
    assert!(steps > 0.0 && steps < total, "{results}");
}

#[test]
fn config_errors_name_the_key_and_its_line_before_anything_loads() {
    let (dir, config) = run_dir(LORA);
    let original = std::fs::read_to_string(&config).unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        // A value of the wrong type inside `method`: the line of `r`, not of `method:`.
        ("r: 4", "r: eight", &["run.yaml:6", "`r`", "eight"]),
        // A negative count: the key, its line and the value found.
        (
            "batch_size: 8",
            "batch_size: -4",
            &["run.yaml:14", "`batch_size`", "-4"],
        ),
        (
            "batch_size: 8",
            "batch_size: 0",
            &["run.yaml:14", "batch_size", "at least 1"],
        ),
        (
            "max_length: 32",
            "max_length: 0",
            &["run.yaml:11", "data.max_length"],
        ),
        // A target the model lacks: the line and the model's own names.
        (
            "[query, value]",
            "[q_proj, v_proj]",
            &["run.yaml:7", "q_proj", "query", "value", "dense"],
        ),
        // A missing data file: `data.train`, its line, the path once.
        (
            "train: train.jsonl",
            "train: nope.jsonl",
            &["run.yaml:9", "data.train", "nope.jsonl does not exist"],
        ),
    ];
    for (from, to, needles) in cases {
        std::fs::write(&config, original.replace(from, to)).unwrap();
        let out = burn_peft()
            .arg("train")
            .arg(&config)
            .args(["--output", "out", "--dry-run"])
            .output()
            .unwrap();
        bad_input(&out, needles);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.matches("No such file").count(), 0, "{stderr}");
    }
    assert!(
        !dir.path().join("out").exists(),
        "a refused run writes nothing"
    );
}

#[test]
fn set_overrides_and_dry_run_print_the_plan() {
    let (dir, config) = run_dir(LORA);
    let out = burn_peft()
        .arg("train")
        .arg(&config)
        .args(["--output", "out", "--dry-run"])
        .args([
            "--set",
            "train.batch_size=16",
            "--set",
            "train.learning_rate=2e-4",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let printed = stdout(&out);
    // 48 rows in batches of 16: 3 steps.
    assert!(printed.contains("plan: 3 steps"), "{printed}");
    assert!(printed.contains("learning rate 2e-4"), "{printed}");
    assert!(printed.contains("dry run"), "{printed}");
    assert!(!dir.path().join("out").exists(), "a dry run writes nothing");
    let out = burn_peft()
        .arg("train")
        .arg(&config)
        .args(["--output", "out", "--set", "train.learnig_rate=1"])
        .output()
        .unwrap();
    bad_input(
        &out,
        &["--set train.learnig_rate", "did you mean `learning_rate`"],
    );
}

#[test]
fn eval_names_a_missing_adapter_and_reads_data_as_training_did() {
    let (dir, config) = run_dir(LORA);
    let run = trained(dir.path(), &config);
    let eval = |extra: &[&str]| {
        burn_peft()
            .args(["eval", "--model", MINILM])
            .args(extra)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    // A typo in --adapter: that folder, not a missing label map.
    let out = eval(&["--adapter", "out/bset", "--data", "eval.jsonl"]);
    bad_input(&out, &["out/bset does not exist"]);
    // The training length is recorded with the adapter and used (and said).
    let adapter = run.join("adapter");
    let adapter = adapter.to_str().unwrap();
    let out = eval(&["--adapter", adapter, "--data", "eval.jsonl"]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("max length 32 (as the adapter was trained"),
        "{stderr}"
    );
    // Other column names: the columns found, and the flags that set them.
    let rows: String = std::fs::read_to_string(dir.path().join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let row: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{}\n",
                serde_json::json!({"body": row["text"], "section": row["label"]})
            )
        })
        .collect();
    std::fs::write(dir.path().join("other.jsonl"), rows).unwrap();
    let out = eval(&["--adapter", adapter, "--data", "other.jsonl"]);
    bad_input(
        &out,
        &["other.jsonl:1", "`body`, `section`", "--text-field"],
    );
    let out = eval(&[
        "--adapter",
        adapter,
        "--data",
        "other.jsonl",
        "--text-field",
        "body",
        "--label-field",
        "section",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // A JSON array is not JSON Lines.
    std::fs::write(
        dir.path().join("array.jsonl"),
        "[{\"text\": \"a\", \"label\": \"x\"}]\n",
    )
    .unwrap();
    let out = eval(&["--adapter", adapter, "--data", "array.jsonl"]);
    bad_input(&out, &["array.jsonl:1", "JSON Lines"]);
    // A TSV file: the formats read and the flag that picks one.
    std::fs::write(dir.path().join("rows.tsv"), "text\tlabel\na\tx\n").unwrap();
    let out = eval(&["--adapter", adapter, "--data", "rows.tsv"]);
    bad_input(
        &out,
        &["rows.tsv", "unsupported data format `tsv`", "--format"],
    );
    let out = eval(&["--adapter", adapter, "--data", "missing.jsonl"]);
    bad_input(&out, &["--data missing.jsonl", "no such file"]);
}

#[test]
fn generate_takes_a_tokenizer_stdin_and_the_servers_length_rule() {
    let dir = tempfile::tempdir().unwrap();
    let bare = fixtures().join("models/gpt2");
    // A folder without tokenizer.json: exit 2 and the flag to pass.
    let out = burn_peft()
        .args(["generate", "--model"])
        .arg(&bare)
        .args(["--prompt", "w1 w2"])
        .output()
        .unwrap();
    bad_input(&out, &["no tokenizer.json", "--tokenizer"]);
    let with = model_with_tokenizer(dir.path(), "gpt2");
    let tokenizer = with.join("tokenizer.json");
    let generate = |prompt: &str, extra: &[&str]| {
        let mut child = burn_peft()
            .args(["generate", "--model"])
            .arg(&bare)
            .arg("--tokenizer")
            .arg(&tokenizer)
            .args(["--prompt", prompt])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"w1 w2 w3").unwrap();
        child.wait_with_output().unwrap()
    };
    let out = generate("w1 w2 w3", &["--max-new-tokens", "4"]);
    assert!(out.status.success(), "{}", text(&out));
    // `--prompt -` reads stdin: the same continuation.
    let piped = generate("-", &["--max-new-tokens", "4"]);
    assert_eq!(stdout(&piped), stdout(&out), "{}", text(&piped));
    // `--stop`: the output ends before the first stop found in the generated text.
    let full = stdout(&generate("w1 w2 w3", &["--max-new-tokens", "6"]));
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() >= 6, "{full}");
    let stop = words[4];
    let cut = stdout(&generate(
        "w1 w2 w3",
        &["--max-new-tokens", "6", "--stop", stop],
    ));
    let start = "w1 w2 w3".len();
    let expected = &full[..start + full[start..].find(stop).unwrap()];
    assert_eq!(
        cut.trim_end(),
        expected.trim_end(),
        "stop {stop:?} in {full:?}"
    );
    // More than the 64 positions: refused as the server refuses it, with what fits.
    let out = generate("w1 w2 w3", &["--max-new-tokens", "300"]);
    bad_input(
        &out,
        &["--max-new-tokens 300", "64 positions", "at most 61"],
    );
}

#[test]
fn an_os_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_with_tokenizer(dir.path(), "gpt2");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = burn_peft()
        .args(["serve", "--model"])
        .arg(&model)
        .args(["--port", &port, "--dtype", "bf16"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("in use").count(), 1, "{stderr}");
    assert!(stderr.contains(&port), "{stderr}");
    // `--dtype` is applied (and said) before the server binds.
    assert!(stderr.contains("base weights in bf16"), "{stderr}");
}

#[test]
fn messages_use_plain_words() {
    // `forward` says what it wrote.
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("sub/../outputs.safetensors");
    let out = burn_peft()
        .args(["forward", "--model"])
        .arg(fixtures().join("models/gpt2"))
        .arg("--inputs")
        .arg(fixtures().join("models/gpt2/inputs.safetensors"))
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let printed = stdout(&out);
    assert!(printed.starts_with("wrote "), "{printed}");
    assert!(printed.contains("logits [3, 7, 128]"), "{printed}");
    assert!(!printed.contains(".."), "{printed}");
    // Every subcommand that runs a model names its devices and dtypes the same way.
    for sub in ["train", "eval", "generate", "serve", "forward", "bench"] {
        let out = burn_peft().args([sub, "--help"]).output().unwrap();
        let help = stdout(&out);
        assert!(
            help.contains("`flex` (CPU), `cuda[:N]` or `vulkan[:N]`"),
            "{sub} --help:\n{help}"
        );
        assert!(
            help.contains("`nf4`, `q8` (adapters stay f32)"),
            "{sub} --help:\n{help}"
        );
    }
}
