//! `burn-peft combine` end to end on the tiny Llama of tests/fixtures/models with the adapters
//! of tests/fixtures/combine: the written bundle is PEFT's combination (config and deltas), it
//! loads back, and bad input is exit code 2 with a message naming the flag or file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn llama() -> PathBuf {
    fixtures().join("models/llama_gqa")
}

fn adapter(case: &str, name: &str) -> PathBuf {
    fixtures()
        .join("combine")
        .join(case)
        .join("adapters")
        .join(name)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn combine(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_burn-peft"))
        .arg("combine")
        .args(args)
        .output()
        .unwrap()
}

fn spec(name: &str, dir: &Path, weight: f64) -> String {
    format!("{name}={}:{weight}", dir.display())
}

fn base_args(output: &Path, adapters: &[String], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--model".to_string(), llama().display().to_string()];
    for a in adapters {
        args.push("--adapter".into());
        args.push(a.clone());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--output".into());
    args.push(output.display().to_string());
    args
}

fn read_json(file: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

/// `scaling * B @ A` per module, as row-major `[out, in]` values.
fn deltas(dir: &Path) -> BTreeMap<String, Vec<f64>> {
    let config = read_json(&dir.join("adapter_config.json"));
    let r = config["r"].as_f64().unwrap();
    let alpha = config["lora_alpha"].as_f64().unwrap();
    let s = if config["use_rslora"].as_bool().unwrap() {
        alpha / r.sqrt()
    } else {
        alpha / r
    };
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let get = |key: &str| {
        let view = st.tensor(key).unwrap();
        let v: Vec<f64> = view
            .data()
            .chunks_exact(4)
            .map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap())))
            .collect();
        (v, view.shape().to_vec())
    };
    let mut out = BTreeMap::new();
    for name in st.names() {
        let (path, b_key) = if let Some(p) = name.strip_suffix(".lora_A.weight") {
            (p, format!("{p}.lora_B.weight"))
        } else if let Some(p) = name.strip_suffix(".lora_embedding_A") {
            (p, format!("{p}.lora_embedding_B"))
        } else {
            continue;
        };
        let (a, sa) = get(name);
        let (b, sb) = get(&b_key);
        let (rank, cols, rows) = (sa[0], sa[1], sb[0]);
        let mut d = vec![0.0; rows * cols];
        for i in 0..rows {
            for k in 0..rank {
                for j in 0..cols {
                    d[i * cols + j] += s * b[i * rank + k] * a[k * cols + j];
                }
            }
        }
        out.insert(path.to_string(), d);
    }
    out
}

fn assert_matches_peft(ours: &Path, peft: &Path) {
    let (mine, theirs) = (deltas(ours), deltas(peft));
    assert_eq!(
        mine.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (path, d) in &mine {
        let diff = d
            .iter()
            .zip(&theirs[path])
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(
            diff < 1e-4,
            "{}: `{path}` differs by {diff}",
            ours.display()
        );
    }
    let (cm, ct) = (
        read_json(&ours.join("adapter_config.json")),
        read_json(&peft.join("adapter_config.json")),
    );
    assert_eq!(cm["r"], ct["r"]);
    assert_eq!(cm["lora_alpha"], ct["lora_alpha"]);
}

#[test]
fn combine_writes_peft_combinations() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = [
        spec("a", &adapter("llama_same", "a"), 0.7),
        spec("b", &adapter("llama_same", "b"), -0.4),
    ];
    for (combo, extra) in [
        ("ties", vec!["--type", "ties", "--density", "0.5"]),
        ("svd", vec!["--type", "svd"]),
        (
            "ties_frequency",
            vec![
                "--type",
                "ties",
                "--density",
                "0.6",
                "--majority-sign-method",
                "frequency",
            ],
        ),
        ("svd_rank2", vec!["--svd-rank", "2"]),
    ] {
        let output = dir.path().join(combo);
        let out = combine(&base_args(&output, &inputs, &extra));
        assert!(out.status.success(), "{combo}: {}", text(&out));
        assert_matches_peft(
            &output,
            &fixtures().join("combine/llama_same/combined").join(combo),
        );
        let config = read_json(&output.join("adapter_config.json"));
        assert_eq!(
            config["base_model_name_or_path"],
            llama().display().to_string()
        );
    }
    // DARE with a seed: the same bundle twice.
    let dare = ["--type", "dare_ties", "--density", "0.5", "--seed", "3"];
    let (one, two) = (dir.path().join("dare1"), dir.path().join("dare2"));
    for output in [&one, &two] {
        let out = combine(&base_args(output, &inputs, &dare));
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(
        std::fs::read(one.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(two.join("adapter_model.safetensors")).unwrap()
    );
    // Three adapters of different ranks, cat.
    let output = dir.path().join("cat");
    let ranks: Vec<String> = [("c", 0.5), ("d", 0.3), ("e", 0.2)]
        .iter()
        .map(|(n, w)| spec(n, &adapter("llama_ranks", n), *w))
        .collect();
    let out = combine(&base_args(&output, &ranks, &["--type", "cat"]));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("r=12"),
        "{}",
        text(&out)
    );
    assert_matches_peft(
        &output,
        &fixtures().join("combine/llama_ranks/combined/cat"),
    );
}

fn bad_input(out: &Output, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(2), "{}", text(out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "missing `{needle}` in:\n{}",
            text(out)
        );
    }
}

#[test]
fn combine_rejects_bad_input_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out");
    let a = spec("a", &adapter("llama_same", "a"), 0.7);
    let b = spec("b", &adapter("llama_same", "b"), 0.3);
    let out = combine(&base_args(
        &output,
        &[a.clone(), b.clone()],
        &["--type", "tie"],
    ));
    bad_input(&out, &["--type", "unknown `tie`", "ties_svd"]);
    let bad_weight = format!("b={}:heavy", adapter("llama_same", "b").display());
    let out = combine(&base_args(&output, &[a.clone(), bad_weight], &[]));
    bad_input(
        &out,
        &["--adapter", "`heavy` is not a number", "NAME=DIR:WEIGHT"],
    );
    let missing = spec("m", &dir.path().join("no-such-adapter"), 0.5);
    let out = combine(&base_args(&output, &[a.clone(), missing], &[]));
    bad_input(
        &out,
        &["--adapter m", "no-such-adapter", "adapter_config.json"],
    );
    let out = combine(&base_args(
        &output,
        &[a.clone(), b.clone()],
        &["--type", "ties"],
    ));
    bad_input(&out, &["density"]);
    let ranks = [
        spec("c", &adapter("llama_ranks", "c"), 0.5),
        spec("d", &adapter("llama_ranks", "d"), 0.5),
    ];
    let out = combine(&base_args(&output, &ranks, &["--type", "linear"]));
    bad_input(&out, &["`c`", "`d`", "`r`", "equal ranks", "use `cat`"]);
    let out = combine(&base_args(&output, &[a.clone(), a], &[]));
    bad_input(&out, &["given twice"]);
    assert!(!output.exists(), "nothing written on bad input");
}
