//! Loading and unloading adapters at run time without harm to the others (issue 22): bundles
//! that would change the shared base are refused, a failing plugin cannot take the scheduler
//! down (and `/health` says so when the scheduler is gone), unloads are idempotent, and names
//! and counts have one rule each.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use burn::tensor::Device;
use common::*;
use peft_core::{AdapterState, BiasMode, PeftMethod, PeftModel, SiteInfo, SiteKind, TargetSpec};
use peft_lora::LoraConfig;
use peft_models::{Task, from_pretrained};
use peft_serve::{ServeConfig, Server};
use serde_json::json;

/// Rewrite the safetensors file `file`, passing each tensor's name and values to `edit`, and
/// adding `extra` tensors.
fn edit_weights(
    file: &Path,
    edit: impl Fn(&str, &mut Vec<f32>),
    extra: &[(&str, Vec<usize>, Vec<f32>)],
) {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let mut values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            edit(&name, &mut values);
            (name, view.shape().to_vec(), values)
        })
        .collect();
    tensors.extend(
        extra
            .iter()
            .map(|(n, s, v)| (n.to_string(), s.clone(), v.clone())),
    );
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(n, s, b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .unwrap();
            (n.clone(), view)
        })
        .collect();
    std::fs::write(file, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A LoRA bundle for the tiny GPT-2 that trains every bias (`bias: all`), with biases that
/// differ from the base's.
fn gpt2_bias_bundle(dest: &Path) {
    let device = Device::flex();
    let gpt2 = fixtures().join("models/gpt2");
    let pretrained = from_pretrained(gpt2.to_str().unwrap(), Task::CausalLm, &device).unwrap();
    let mut model = PeftModel::new(pretrained.model);
    let lora = LoraConfig {
        r: 2,
        target_modules: Some(["c_attn"].into()),
        bias: BiasMode::All,
        ..Default::default()
    };
    model.add_adapter("default", &lora).unwrap();
    model.save_adapter(dest, "default").unwrap();
    edit_weights(
        &dest.join("adapter_model.safetensors"),
        |name, values| {
            if name.ends_with("bias") {
                values.iter_mut().for_each(|v| *v += 1.0);
            }
        },
        &[],
    );
}

/// Case 3: a bundle with trained biases or an embedding `base_layer` used to overwrite the
/// base tensors every adapter shares; the server refuses it (at run time and at start), and
/// the base answers as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_that_would_change_the_shared_base_are_refused() {
    bounded(120, async {
        let root = tempfile::tempdir().unwrap();
        let bundles = root.path().join("bundles");
        gpt2_bias_bundle(&bundles.join("bias"));
        let gpt2 = fixtures().join("models/gpt2");
        let config = ServeConfig {
            adapters_dir: Some(bundles.clone()),
            ..ServeConfig::new(gpt2.to_str().unwrap())
        };
        let server = start(config).await;
        let c = &server.client;
        let prompt = [3, 17, 42, 9];
        let before = token_ids(
            &c.post("/v1/completions", &greedy("base", &prompt, 12))
                .await
                .unwrap(),
        );
        let reply = c
            .post("/v1/adapters", &json!({"name": "bias", "path": "bias"}))
            .await
            .unwrap();
        assert_eq!(reply.status, 400, "{}", reply.text());
        assert_eq!(reply.json()["error"]["param"], "path");
        assert!(reply.text().contains("bias"), "{}", reply.text());
        let after = token_ids(
            &c.post("/v1/completions", &greedy("base", &prompt, 12))
                .await
                .unwrap(),
        );
        assert_eq!(before, after);

        // The same bundle at start is a configuration error.
        let start_config = ServeConfig {
            adapters: vec![("bias".into(), bundles.join("bias"))],
            ..ServeConfig::new(gpt2.to_str().unwrap())
        };
        let loaded =
            tokio::task::spawn_blocking(move || Server::load(&start_config, &Device::flex()))
                .await
                .unwrap();
        let err = loaded.err().expect("a bias bundle at start is refused");
        assert!(err.to_string().contains("bias"), "{err}");

        // An embedding table saved with the adapter (PEFT's `save_embedding_layers`).
        let emb = bundles.join("emb");
        copy_bundle(&llama_adapters()[0].1, &emb);
        edit_weights(
            &emb.join("adapter_model.safetensors"),
            |_, _| {},
            &[(
                "base_model.model.model.embed_tokens.base_layer.weight",
                vec![128, 32],
                vec![0.5; 128 * 32],
            )],
        );
        let config = ServeConfig {
            adapters_dir: Some(bundles.clone()),
            ..llama_config()
        };
        let server = start(config).await;
        let c = &server.client;
        let before = token_ids(
            &c.post("/v1/completions", &greedy("sql", &prompt, 12))
                .await
                .unwrap(),
        );
        let reply = c
            .post("/v1/adapters", &json!({"name": "emb", "path": "emb"}))
            .await
            .unwrap();
        assert_eq!(reply.status, 400, "{}", reply.text());
        assert!(reply.text().contains("embed_tokens"), "{}", reply.text());
        let after = token_ids(
            &c.post("/v1/completions", &greedy("sql", &prompt, 12))
                .await
                .unwrap(),
        );
        assert_eq!(before, after);
    })
    .await;
}

/// A method whose adapter construction panics: a plugin bug the scheduler must survive.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct PanicOnLoad {}

#[typetag::serde(name = "PANIC_ON_LOAD")]
impl PeftMethod for PanicOnLoad {
    fn targets(&self) -> TargetSpec {
        TargetSpec::default()
    }

    fn supports(&self, kind: &SiteKind) -> bool {
        matches!(kind, SiteKind::KvPrefix { .. })
    }

    fn adapts_attention_prefix(&self) -> bool {
        true
    }

    fn create_adapter(&self, _: &str, _: &SiteInfo) -> peft_core::Result<AdapterState> {
        panic!("a bug in a method plugin")
    }

    fn clone_method(&self) -> Box<dyn PeftMethod> {
        Box::new(self.clone())
    }
}

/// Case 5: a panic while loading an adapter used to end the scheduler thread (loads ran
/// outside `catch_unwind`): every later request got 503 while `/health` said ok. Now the load
/// fails alone, and `/health` reports a scheduler that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_load_fails_alone_and_health_reports_the_scheduler() {
    bounded(120, async {
        let root = tempfile::tempdir().unwrap();
        let boom = root.path().join("boom");
        std::fs::create_dir_all(&boom).unwrap();
        std::fs::write(
            boom.join("adapter_config.json"),
            json!({"peft_type": "PANIC_ON_LOAD"}).to_string(),
        )
        .unwrap();
        let empty: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
        std::fs::write(
            boom.join("adapter_model.safetensors"),
            safetensors::serialize(empty, None).unwrap(),
        )
        .unwrap();
        let config = ServeConfig {
            adapters_dir: Some(root.path().to_path_buf()),
            ..llama_config()
        };
        let server = start(config).await;
        let c = &server.client;
        let reply = c
            .post("/v1/adapters", &json!({"name": "boom", "path": "boom"}))
            .await
            .unwrap();
        assert_eq!(reply.status, 500, "{}", reply.text());
        assert!(reply.text().contains("panic"), "{}", reply.text());
        let reply = c
            .post("/v1/completions", &greedy("sql", &[1, 2], 4))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        let health = c.get("/health").await.unwrap();
        assert_eq!(health.status, 200);
        let models = c.get("/v1/models").await.unwrap().json();
        assert_eq!(models["data"].as_array().unwrap().len(), 5, "{models}");

        // The scheduler gone (the server dropped while its routes still answer): 503.
        let server = tokio::task::spawn_blocking(|| Server::load(&llama_config(), &Device::flex()))
            .await
            .unwrap()
            .unwrap();
        let router = server.router();
        drop(server);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let client = peft_serve::client::Client::new(addr);
        let mut last = None;
        for _ in 0..500 {
            let reply = client.get("/health").await.unwrap();
            if reply.status == 503 {
                last = Some(reply);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let reply = last.expect("/health kept answering 200 without a scheduler");
        assert_eq!(reply.json()["status"], "unavailable", "{}", reply.text());
    })
    .await;
}

/// Case 7: two `DELETE`s of a busy adapter both waited; the second answered 500 and
/// `burn_peft_adapters_loaded` wrapped to 2^64 - 1. Now the second is answered like the first
/// (idempotent) and the gauge counts down once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_unloads_of_a_busy_adapter_are_idempotent() {
    bounded(300, async {
        let config = ServeConfig {
            adapters: llama_adapters()[..1].to_vec(),
            max_batch: 1,
            ..ServeConfig::new(llama().to_str().unwrap())
        };
        let server = start(config).await;
        // Requests on `sql` that keep it busy: one runs, the others wait for the one slot.
        let running: Vec<_> = (0..12)
            .map(|i| {
                let c = server.client.clone();
                tokio::spawn(async move {
                    c.post("/v1/completions", &greedy("sql", &[1 + i, 2], 50))
                        .await
                        .unwrap()
                })
            })
            .collect();
        for _ in 0..1000 {
            if server.metrics.queue_depth.load(Ordering::SeqCst) >= 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let deletes: Vec<_> = (0..2)
            .map(|_| {
                let c = server.client.clone();
                tokio::spawn(async move { c.delete("/v1/adapters/sql").await.unwrap() })
            })
            .collect();
        let mut statuses = Vec::new();
        for d in deletes {
            let reply = d.await.unwrap();
            statuses.push((reply.status, reply.text()));
        }
        statuses.sort();
        assert_eq!(statuses[0].0, 200, "{statuses:?}");
        assert!(matches!(statuses[1].0, 200 | 404), "{statuses:?}");
        for task in running {
            assert_eq!(task.await.unwrap().status, 200);
        }
        assert_eq!(server.metrics.adapters_loaded.load(Ordering::Relaxed), 0);
        let text = server.client.get("/metrics").await.unwrap().text();
        assert_eq!(
            metric(&text, "burn_peft_adapters_loaded"),
            Some(0.0),
            "{text}"
        );
    })
    .await;
}

/// Case 9: one name rule, checked first (a `.` in a name was accepted by the server and then
/// refused by the core, the error blaming `path`); and a limit on loaded adapters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_names_have_one_rule_and_loaded_adapters_a_limit() {
    bounded(120, async {
        let root = tempfile::tempdir().unwrap();
        copy_bundle(&llama_adapters()[0].1, &root.path().join("sql"));
        let config = ServeConfig {
            adapters: llama_adapters()[..1].to_vec(),
            adapters_dir: Some(root.path().to_path_buf()),
            max_adapters: 2,
            ..ServeConfig::new(llama().to_str().unwrap())
        };
        let server = start(config).await;
        let c = &server.client;
        for name in ["v1.2", "a/b", "base", ""] {
            let reply = c
                .post("/v1/adapters", &json!({"name": name, "path": "sql"}))
                .await
                .unwrap();
            assert_eq!(reply.status, 400, "{name}: {}", reply.text());
            assert_eq!(reply.json()["error"]["param"], "name", "{}", reply.text());
        }
        let load = |name: &'static str| {
            let c = c.clone();
            async move {
                c.post("/v1/adapters", &json!({"name": name, "path": "sql"}))
                    .await
                    .unwrap()
            }
        };
        assert_eq!(load("v1_2").await.status, 201);
        let full = load("third").await;
        assert_eq!(full.status, 409, "{}", full.text());
        assert!(full.text().contains("2 adapters"), "{}", full.text());
        assert_eq!(c.delete("/v1/adapters/v1_2").await.unwrap().status, 200);
        assert_eq!(load("third").await.status, 201);
        assert_eq!(server.metrics.adapters_loaded.load(Ordering::Relaxed), 2);

        // More adapters at start than the limit allows.
        let too_many = ServeConfig {
            adapters: llama_adapters(),
            max_adapters: 3,
            ..ServeConfig::new(llama().to_str().unwrap())
        };
        let loaded = tokio::task::spawn_blocking(move || Server::load(&too_many, &Device::flex()))
            .await
            .unwrap();
        let err = loaded.err().expect("four adapters with --max-adapters 3");
        assert!(err.to_string().contains("--max-adapters"), "{err}");
    })
    .await;
}
