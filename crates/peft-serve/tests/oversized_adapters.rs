//! Case 4 of issue 22: an `adapter_config.json` whose sizes its weights file cannot back
//! (`"r": 1099511627776` with `all-linear`, a prefix of 2^40 virtual tokens) made the load
//! allocate terabytes before any shape check, and the allocation failure aborted the whole
//! process (an abort is not a panic: `catch_unwind` cannot stop it). The config is now checked
//! against the tensors in the file first: 400 naming the key, and the server goes on.
//!
//! In a file of its own: before the fix, the abort ended this whole test binary.

mod common;

use std::path::Path;

use common::*;
use peft_serve::ServeConfig;
use serde_json::{Value, json};

/// Copy the bundle `from` to `dest`, applying `edit` to its config.
fn edited_bundle(from: &Path, dest: &Path, edit: impl Fn(&mut Value)) {
    copy_bundle(from, dest);
    let file = dest.join("adapter_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&file, config.to_string()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configs_the_weights_cannot_back_are_refused_before_any_allocation() {
    bounded(120, async {
        let root = tempfile::tempdir().unwrap();
        let sql = &llama_adapters()[0].1;
        let table = fixtures().join("prefix/llama_gqa_table");
        let mlp = fixtures().join("prefix/llama_gqa_mlp");
        let huge = 1u64 << 40;
        edited_bundle(sql, &root.path().join("rank"), |c| {
            c["r"] = json!(huge);
            c["target_modules"] = json!("all-linear");
        });
        edited_bundle(sql, &root.path().join("pattern"), |c| {
            c["target_modules"] = json!(["q_proj", "k_proj", "v_proj"]);
            c["rank_pattern"] = json!({"k_proj": huge});
        });
        edited_bundle(&table, &root.path().join("tokens"), |c| {
            c["num_virtual_tokens"] = json!(huge);
        });
        edited_bundle(&mlp, &root.path().join("hidden"), |c| {
            c["encoder_hidden_size"] = json!(huge);
        });
        let config = ServeConfig {
            adapters_dir: Some(root.path().to_path_buf()),
            ..llama_config()
        };
        let server = start(config).await;
        let c = &server.client;
        for (path, key) in [
            ("rank", "`r`"),
            ("pattern", "rank_pattern"),
            ("tokens", "num_virtual_tokens"),
            ("hidden", "encoder_hidden_size"),
        ] {
            let reply = c
                .post("/v1/adapters", &json!({"name": path, "path": path}))
                .await
                .unwrap();
            assert_eq!(reply.status, 400, "{path}: {}", reply.text());
            assert!(reply.text().contains(key), "{path}: {}", reply.text());
        }
        let reply = c
            .post("/v1/completions", &greedy("sql", &[1, 2], 3))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        // The honest bundles still load.
        for path in ["sql", "table", "mlp"] {
            let from = match path {
                "sql" => sql.clone(),
                "table" => table.clone(),
                _ => mlp.clone(),
            };
            copy_bundle(&from, &root.path().join(format!("ok-{path}")));
            let name = format!("ok-{path}");
            let reply = c
                .post("/v1/adapters", &json!({"name": name, "path": name}))
                .await
                .unwrap();
            assert_eq!(reply.status, 201, "{path}: {}", reply.text());
        }
    })
    .await;
}
