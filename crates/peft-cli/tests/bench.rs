//! `burn-peft bench` on a random Llama from a config.json alone (the Rust half of
//! benches/gpu/): it runs, reports what benches/gpu/lora_llama_gpu.py reads, and starts from
//! transformers' initialization, so the first loss is near ln(vocab) as PyTorch's is.

use std::process::Command;

#[test]
fn bench_on_a_random_llama_reports_throughput_from_a_transformers_like_start() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = 256;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": vocab, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": true
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_burn-peft"))
        .args(["bench", "--model"])
        .arg(dir.path())
        .args([
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--steps",
            "2",
            "--warmup",
            "1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["tokens_per_sec"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["step_ms"].as_array().unwrap().len(), 2, "{report}");
    // q_proj and v_proj of 2 layers, r 16: A [16, 64] and B [out, 16], out 64 (q) and 32 (v).
    assert_eq!(
        report["trainable_params"],
        2 * (16 * 64 + 64 * 16 + 16 * 64 + 32 * 16)
    );
    // N(0, 0.02) weights give near-uniform next-token probabilities; Burn's default
    // initialization gave losses in the hundreds on this tied head.
    let first = report["losses"][0].as_f64().unwrap();
    let uniform = (vocab as f64).ln();
    assert!(
        (first - uniform).abs() < 0.5,
        "first loss {first}, ln(vocab) {uniform}"
    );
}
