//! The command line under issue 22: sizes that overflow, adapter configs that would allocate
//! terabytes, training settings that break the update, runs that would mix in one folder, and
//! a server that a second Ctrl-C stops while a client holds a request open. Each bad input is
//! exit code 2 with the key, the limit and what to do; nothing panics or aborts.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

mod common;

use common::{ServeProcess, bad_input, burn_peft, fixtures, model_with_tokenizer, sentence, text};

/// Case 1: `--max-new-tokens` near `usize::MAX` overflowed `prompt + new + prefix` (a panic
/// in dev builds, a wrapped sum that passed the check in release).
#[test]
fn generate_with_max_new_tokens_near_the_limit_of_usize_is_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_with_tokenizer(tmp.path(), "gpt2");
    for max in ["18446744073709551615", "18446744073709551610"] {
        let out = burn_peft()
            .args(["generate", "--model"])
            .arg(&model)
            .args(["--prompt", &sentence(4, 1), "--max-new-tokens", max])
            .output()
            .unwrap();
        bad_input(
            &out,
            &["--max-new-tokens", "64 positions", "at most 60 new tokens"],
        );
    }
}

/// Case 4: an adapter config whose rank its weights file cannot back (`"r": 2^40` with
/// `all-linear`) aborted the process while allocating; now exit code 2 naming `r`.
#[test]
fn an_adapter_whose_rank_the_weights_cannot_back_is_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let from = fixtures().join("mixed/llama_gqa/sql");
    let bundle = tmp.path().join("huge");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::copy(
        from.join("adapter_model.safetensors"),
        bundle.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("adapter_config.json")).unwrap())
            .unwrap();
    config["r"] = json!(1u64 << 40);
    config["target_modules"] = json!("all-linear");
    std::fs::write(bundle.join("adapter_config.json"), config.to_string()).unwrap();
    let model = fixtures().join("models/llama_gqa");
    let out = burn_peft()
        .args(["forward", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(&bundle)
        .arg("--inputs")
        .arg(model.join("inputs.safetensors"))
        .arg("--output")
        .arg(tmp.path().join("out.safetensors"))
        .output()
        .unwrap();
    bad_input(
        &out,
        &["adapter_config.json", "`r`", "1099511627776", "rank 4"],
    );
}

/// A run config over the tiny BERT classifier with a word-level tokenizer; `extra` lines go
/// into the `train:` block, `eval` adds `data.eval`.
fn write_run(dir: &Path, extra: &str, eval: bool) -> PathBuf {
    let model = dir.join("bert_cls");
    if !model.is_dir() {
        model_with_tokenizer(dir, "bert_cls");
    }
    let data: String = (0..12)
        .map(|i| {
            let label = ["a", "b", "c"][i % 3];
            json!({"text": sentence(6, i), "label": label}).to_string() + "\n"
        })
        .collect();
    std::fs::write(dir.join("train.jsonl"), &data).unwrap();
    let eval_line = if eval { "  eval: train.jsonl\n" } else { "" };
    let yaml = format!(
        "model:\n  name_or_path: {}\n  task: classification\nmethod:\n  peft_type: LORA\n  r: 2\n  target_modules: [query, value]\ndata:\n  train: train.jsonl\n{eval_line}  test: train.jsonl\n  max_length: 16\ntrain:\n  epochs: 1\n  max_steps: 2\n  batch_size: 4\n  learning_rate: 1.0e-2\n  save_every: 1\n  progress: false\n{extra}output: out\n",
        model.display()
    );
    let file = dir.join("run.yaml");
    std::fs::write(&file, yaml).unwrap();
    file
}

/// Case 12: settings that make the update NaN, flip it or never stop are refused at load,
/// naming the file, the line and the key.
#[test]
fn train_refuses_out_of_range_settings_with_file_line_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    for (extra, line, key) in [
        ("  max_grad_norm: 0\n", 20, "max_grad_norm"),
        (
            "  early_stopping_patience: 0\n",
            20,
            "early_stopping_patience",
        ),
        ("  adamw:\n    beta1: 1.0\n", 21, "beta1"),
    ] {
        let run = write_run(tmp.path(), extra, true);
        let out = burn_peft().arg("train").arg(&run).output().unwrap();
        bad_input(&out, &[&format!("run.yaml:{line}"), key]);
        assert!(
            !tmp.path().join("out/checkpoints").exists(),
            "{}",
            text(&out)
        );
    }
    let run = write_run(tmp.path(), "", true);
    let yaml = std::fs::read_to_string(&run)
        .unwrap()
        .replace("learning_rate: 1.0e-2", "learning_rate: .nan");
    std::fs::write(&run, yaml).unwrap();
    let out = burn_peft().arg("train").arg(&run).output().unwrap();
    bad_input(&out, &["run.yaml:17", "learning_rate"]);
}

/// Case 13: a second, different run into the same output folder is refused (exit 2, naming
/// `--overwrite`); `--overwrite` starts over; `--resume latest` refuses a checkpoint of
/// another config unless `--force-resume`; and without `data.eval` the held-out test scores
/// this run's adapter, never a `best/` another run left.
#[test]
fn runs_never_mix_in_one_output_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let run = write_run(tmp.path(), "", true);
    let out = burn_peft().arg("train").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(tmp.path().join("out/best").is_dir());

    let run = write_run(tmp.path(), "  seed: 7\n", false);
    let out = burn_peft().arg("train").arg(&run).output().unwrap();
    bad_input(&out, &["out", "--overwrite", "--resume"]);
    let out = burn_peft()
        .arg("train")
        .arg(&run)
        .arg("--overwrite")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!tmp.path().join("out/best").exists(), "{stdout}");
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("out/results.json")).unwrap(),
    )
    .unwrap();
    assert!(results["best_dir"].is_null(), "{results}");
    assert!(stdout.contains("out/adapter"), "{stdout}");

    let run = write_run(tmp.path(), "  seed: 7\n  batch_size: 2\n", false);
    let yaml = std::fs::read_to_string(&run)
        .unwrap()
        .replace("  batch_size: 4\n", "");
    std::fs::write(&run, yaml).unwrap();
    let out = burn_peft()
        .arg("train")
        .arg(&run)
        .args(["--resume", "latest", "--max-steps", "3"])
        .output()
        .unwrap();
    bad_input(&out, &["batch_size", "--force-resume"]);
    let out = burn_peft()
        .arg("train")
        .arg(&run)
        .args(["--resume", "latest", "--max-steps", "3", "--force-resume"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}

/// Case 6: `serve` ends on Ctrl-C even while a client holds a request open: the first asks
/// for a graceful shutdown (requests in flight get `--shutdown-grace`), a second one ends it
/// at once (it used to be swallowed while the shutdown waited for the client forever).
#[cfg(unix)]
#[test]
fn a_second_ctrl_c_stops_the_server_while_a_client_holds_a_request() {
    let model = fixtures().join("models/llama_gqa");
    let args = [
        "--port",
        "0",
        "--shutdown-grace",
        "3600",
        // Timeouts beyond the test's bound: only the second Ctrl-C can end the request.
        "--body-timeout",
        "3600",
        "--header-timeout",
        "3600",
        "--model",
    ];
    let mut args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    args.push(model.as_os_str());
    let mut server = ServeProcess::spawn(&args);
    let wait = Duration::from_secs(60);
    let outcome = (|| -> Result<(), String> {
        let addr = server.address(wait)?;
        let mut held = std::net::TcpStream::connect(&addr).map_err(|e| e.to_string())?;
        held.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            .map_err(|e| e.to_string())?;
        let pid = server.child.id().to_string();
        let interrupt = || {
            std::process::Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .map(|_| ())
        };
        interrupt().map_err(|e| e.to_string())?;
        server
            .wait_for("Ctrl-C again", wait)
            .ok_or("no message after the first Ctrl-C")?;
        interrupt().map_err(|e| e.to_string())?;
        // The client holds its request for an hour: only the second Ctrl-C can end it.
        for _ in 0..600 {
            if let Some(status) = server.child.try_wait().map_err(|e| e.to_string())? {
                drop(held);
                return match status.code() {
                    Some(0) => Ok(()),
                    other => Err(format!("exit status {other:?}")),
                };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err("still running after the second Ctrl-C".into())
    })();
    if let Err(why) = outcome {
        panic!("{why}; stderr so far:\n{}", server.seen.join("\n"));
    }
}
