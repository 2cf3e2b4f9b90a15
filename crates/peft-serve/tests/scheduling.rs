//! The scheduler under load, on loopback: concurrent requests over several adapters return
//! exactly what they return one at a time; a full queue answers 503 instead of hanging;
//! adapters load and unload while requests run; a client that disconnects frees its slot.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use peft_serve::ServeConfig;
use serde_json::json;

/// 64 requests over the base model and the four adapters (one of them prefix tuning), with
/// prompts and lengths that differ.
fn mixed_requests() -> Vec<serde_json::Value> {
    let names = ["sql", "chat", "lora", "table"];
    (0..64)
        .map(|i| {
            let len = 1 + (i * 7) % 9;
            let prompt: Vec<i64> = (0..len)
                .map(|j| ((i * 13 + j * 5) % 120 + 3) as i64)
                .collect();
            greedy(names[i % 4], &prompt, 4 + (i * 3) % 12)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_over_four_adapters_equal_one_at_a_time() {
    bounded(300, async {
        let config = ServeConfig {
            max_batch: 64,
            ..llama_config()
        };
        let server = start(config).await;
        let requests = mixed_requests();
        let mut alone = Vec::new();
        for request in &requests {
            let reply = server
                .client
                .post("/v1/completions", request)
                .await
                .unwrap();
            assert_eq!(reply.status, 200, "{}", reply.text());
            alone.push(token_ids(&reply));
        }
        let steps_alone = server.metrics.steps.load(Ordering::Relaxed);
        let tasks: Vec<_> = requests
            .iter()
            .cloned()
            .map(|request| {
                let client = server.client.clone();
                tokio::spawn(async move { client.post("/v1/completions", &request).await.unwrap() })
            })
            .collect();
        for (i, task) in tasks.into_iter().enumerate() {
            let reply = task.await.unwrap();
            assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
            assert_eq!(token_ids(&reply), alone[i], "request {i}: {}", requests[i]);
        }
        // They really ran batched: far fewer forward steps than one at a time.
        let steps_together = server.metrics.steps.load(Ordering::Relaxed) - steps_alone;
        assert!(
            steps_together * 2 < steps_alone,
            "{steps_together} vs {steps_alone}"
        );
        let metrics = server.client.get("/metrics").await.unwrap().text();
        assert!(
            metrics
                .contains("burn_peft_requests_total{endpoint=\"completions\",status=\"200\"} 128")
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_503_with_retry_after_not_a_hang() {
    bounded(120, async {
        let config = ServeConfig {
            max_batch: 1,
            max_queue: 2,
            ..llama_config()
        };
        let server = start(config).await;
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let client = server.client.clone();
                let request = greedy("sql", &[3 + i, 7, 9], 40);
                tokio::spawn(async move { client.post("/v1/completions", &request).await.unwrap() })
            })
            .collect();
        let mut ok = 0;
        let mut busy = 0;
        for task in tasks {
            let reply = task.await.unwrap();
            match reply.status {
                200 => ok += 1,
                503 => {
                    busy += 1;
                    assert_eq!(reply.headers["retry-after"], "1");
                    assert_eq!(reply.json()["error"]["type"], "overloaded_error");
                }
                other => panic!("status {other}: {}", reply.text()),
            }
        }
        assert!(busy > 0 && ok > 0, "{ok} answered, {busy} refused");
        assert_eq!(ok + busy, 16);
        // Once the queue drains, requests are served again.
        let reply = server
            .client
            .post("/v1/completions", &greedy("sql", &[1], 2))
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(server.metrics.queue_depth.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adapters_load_and_unload_while_requests_run() {
    bounded(300, async {
        let root = tempfile::tempdir().unwrap();
        for (name, dir) in llama_adapters() {
            copy_bundle(&dir, &root.path().join("bundles").join(&name));
        }
        let outside = tempfile::tempdir().unwrap();
        copy_bundle(&llama_adapters()[0].1, outside.path());
        std::os::unix::fs::symlink(outside.path(), root.path().join("bundles/escape")).unwrap();
        let config = ServeConfig {
            adapters: llama_adapters()[..1].to_vec(),
            adapters_dir: Some(root.path().join("bundles")),
            max_batch: 8,
            ..ServeConfig::new(llama().to_str().unwrap())
        };
        let server = start(config).await;
        let c = server.client.clone();
        // Reference answers of `chat` and `sql` from a server that has them from the start.
        let reference = start(llama_config()).await;
        let prompt = [4, 8, 15, 16];
        let want_sql = token_ids(
            &reference
                .client
                .post("/v1/completions", &greedy("sql", &prompt, 40))
                .await
                .unwrap(),
        );
        let want_chat = token_ids(
            &reference
                .client
                .post("/v1/completions", &greedy("chat", &prompt, 40))
                .await
                .unwrap(),
        );
        drop(reference);

        // Requests on `sql` run while `chat` loads and `sql` unloads.
        let running: Vec<_> = (0..12)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    c.post("/v1/completions", &greedy("sql", &prompt, 40))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let loaded = c
            .post("/v1/adapters", &json!({"name": "chat", "path": "chat"}))
            .await
            .unwrap();
        assert_eq!(loaded.status, 201, "{}", loaded.text());
        assert_eq!(loaded.json()["id"], "chat");
        let chat = c
            .post("/v1/completions", &greedy("chat", &prompt, 40))
            .await
            .unwrap();
        assert_eq!(token_ids(&chat), want_chat);
        let unloaded = c.delete("/v1/adapters/sql").await.unwrap();
        assert_eq!(unloaded.status, 200, "{}", unloaded.text());
        assert_eq!(unloaded.json()["deleted"], true);
        // The unload waited: every request that was running on `sql` finished, none lost.
        for task in running {
            let reply = task.await.unwrap();
            assert_eq!(reply.status, 200, "{}", reply.text());
            assert_eq!(token_ids(&reply), want_sql);
        }
        let gone = c
            .post("/v1/completions", &greedy("sql", &prompt, 4))
            .await
            .unwrap();
        assert_eq!(gone.status, 404);
        let models = c.get("/v1/models").await.unwrap().json();
        let ids: Vec<&str> = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["base", "chat"]);
        // Load it again under its old name; a prefix-tuning bundle too.
        let again = c
            .post("/v1/adapters", &json!({"name": "sql", "path": "./sql"}))
            .await
            .unwrap();
        assert_eq!(again.status, 201, "{}", again.text());
        let table = c
            .post("/v1/adapters", &json!({"name": "table", "path": "table"}))
            .await
            .unwrap();
        assert_eq!(table.status, 201, "{}", table.text());
        assert_eq!(table.json()["peft_type"], "PREFIX_TUNING");
        let sql = c
            .post("/v1/completions", &greedy("sql", &prompt, 40))
            .await
            .unwrap();
        assert_eq!(token_ids(&sql), want_sql);
        // Only from under --adapters-dir.
        for (path, status) in [
            ("../bundles/sql", 400),
            ("/etc", 400),
            ("escape", 403),
            ("missing", 404),
        ] {
            let reply = c
                .post("/v1/adapters", &json!({"name": "x", "path": path}))
                .await
                .unwrap();
            assert_eq!(reply.status, status, "{path}: {}", reply.text());
        }
        // A folder that is not a bundle is a 400, and the server goes on.
        std::fs::create_dir(root.path().join("bundles/empty")).unwrap();
        let reply = c
            .post("/v1/adapters", &json!({"name": "x", "path": "empty"}))
            .await
            .unwrap();
        assert_eq!(reply.status, 400, "{}", reply.text());
        assert_eq!(server.metrics.adapters_loaded.load(Ordering::Relaxed), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_disconnects_frees_its_slot() {
    bounded(120, async {
        // The tiny model makes 60 tokens in a few milliseconds, about as long as the server
        // takes to see the client go: a try where the stream ran to its end before that says
        // nothing about cancellation, so up to five tries must show one stopped early.
        let mut stopped_early = Vec::new();
        for _ in 0..5 {
            let config = ServeConfig {
                max_batch: 1,
                ..llama_config()
            };
            let server = start(config).await;
            let mut request = greedy("sql", &[1, 2], 60);
            request["stream"] = json!(true);
            let response = server
                .client
                .open(
                    hyper::Method::POST,
                    "/v1/completions",
                    Some(request.to_string().into_bytes()),
                )
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let mut body = response.into_body();
            use http_body_util::BodyExt;
            let first = body.frame().await.unwrap().unwrap();
            assert!(first.data_ref().is_some_and(|d| d.starts_with(b"data:")));
            drop(body);
            // The only slot frees: the scheduler drops the job, and the next request is
            // answered.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while server.metrics.running.load(Ordering::Relaxed) != 0 {
                assert!(std::time::Instant::now() < deadline, "the slot never freed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let generated = server.metrics.generated_tokens.load(Ordering::Relaxed);
            let reply = server
                .client
                .post("/v1/completions", &greedy("chat", &[5], 3))
                .await
                .unwrap();
            assert_eq!(reply.status, 200);
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(server.metrics.running.load(Ordering::Relaxed), 0);
            stopped_early.push(generated);
            if generated < 60 {
                break;
            }
        }
        assert!(
            stopped_early.iter().any(|&g| g < 60),
            "the dropped stream ran to its end every time: {stopped_early:?} tokens"
        );
    })
    .await;
}
