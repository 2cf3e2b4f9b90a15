//! What a hostile or careless client can try, on loopback (issue 22): sizes that overflow,
//! requests that would allocate without bound, connections that never finish their request,
//! stop strings of any length, a timeout that overflows, and ids that say too much or too
//! little. Every case gets a clear answer and the server keeps serving.

mod common;

use std::time::Duration;

use common::*;
use peft_serve::ServeConfig;
use serde_json::{Value, json};

/// The tiny BERT encoder (vocab 128, 64 positions).
fn bert() -> std::path::PathBuf {
    fixtures().join("models/bert")
}

/// Case 1: `max_tokens` near `u64::MAX` used to overflow `prompt + prefix + max_tokens`
/// (a panic in the handler in dev builds, a wrapped sum that passed the check in release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_near_u64_max_is_a_400_naming_max_tokens() {
    bounded(120, async {
        let server = start(llama_config()).await;
        let c = &server.client;
        for model in ["base", "table"] {
            for max in [u64::MAX, u64::MAX - 3, 1 << 63, 18446744073709551000] {
                let body = json!({"model": model, "prompt": [1, 2], "max_tokens": max});
                let reply = c.post("/v1/completions", &body).await.unwrap();
                assert_eq!(reply.status, 400, "{model} {max}: {}", reply.text());
                let error = &reply.json()["error"];
                assert_eq!(error["param"], "max_tokens", "{}", reply.text());
                let message = error["message"].as_str().unwrap();
                assert!(
                    message.contains("64") && message.contains("max_position_embeddings"),
                    "{message}"
                );
            }
        }
        let reply = c
            .post("/v1/completions", &greedy("base", &[1, 2], 3))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    })
    .await;
}

/// Case 2: one embeddings request was one forward over all its inputs padded to the longest.
/// Now a request holds at most `max_inputs` inputs (400 beyond), and the scheduler runs them
/// in chunks of at most `max_batch` rows, with the same results as one input at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_capped_per_request_and_run_in_chunks_of_max_batch() {
    bounded(120, async {
        let config = ServeConfig {
            max_batch: 4,
            max_inputs: 16,
            ..ServeConfig::new(bert().to_str().unwrap())
        };
        let server = start(config).await;
        let c = &server.client;
        let many: Vec<Vec<i64>> = (0..17).map(|i| vec![5 + i]).collect();
        let reply = c
            .post("/v1/embeddings", &json!({"model": "base", "input": many}))
            .await
            .unwrap();
        assert_eq!(reply.status, 400, "{}", reply.text());
        assert_eq!(reply.json()["error"]["param"], "input");
        assert!(reply.text().contains("16"), "{}", reply.text());

        // Ten inputs of different lengths: three forwards of at most 4 rows.
        let inputs: Vec<Vec<i64>> = (0..10)
            .map(|i| (0..(1 + i * 5)).map(|k| 3 + (i * 7 + k) % 120).collect())
            .collect();
        let reply = c
            .post("/v1/embeddings", &json!({"model": "base", "input": inputs}))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        let together: Vec<Value> = reply.json()["data"].as_array().unwrap().clone();
        assert_eq!(together.len(), 10);
        let metrics = c.get("/metrics").await.unwrap().text();
        let count = metric(&metrics, "burn_peft_batch_size_count").unwrap();
        let at_most_4 = metric(&metrics, "burn_peft_batch_size_bucket{le=\"4\"}").unwrap();
        assert_eq!(
            count, at_most_4,
            "a forward ran more than 4 rows:\n{metrics}"
        );
        for (i, input) in inputs.iter().enumerate() {
            let alone = c
                .post("/v1/embeddings", &json!({"model": "base", "input": input}))
                .await
                .unwrap();
            let alone = alone.json()["data"][0]["embedding"].clone();
            let chunked = together[i]["embedding"].clone();
            assert_eq!(together[i]["index"], i);
            for (a, b) in alone
                .as_array()
                .unwrap()
                .iter()
                .zip(chunked.as_array().unwrap())
            {
                let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
                assert!((a - b).abs() < 1e-5, "input {i}: {a} vs {b}");
            }
        }
    })
    .await;
}

/// Case 6: a client that never finishes its request head is disconnected after
/// `header_timeout`, one that trickles its body gets 408 after `body_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_by_the_header_and_body_timeouts() {
    bounded(60, async {
        let config = ServeConfig {
            header_timeout: Duration::from_millis(300),
            body_timeout: Duration::from_millis(300),
            ..llama_config()
        };
        let server = start(config).await;
        let mut head = raw_send(server.addr, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n").await;
        let answer = read_until_closed(&mut head, 1 << 16).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
            "{answer}"
        );
        let mut body = raw_send(
            server.addr,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"model\": ",
        )
        .await;
        let answer = read_until_closed(&mut body, 1 << 16).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        let reply = server.client.get("/health").await.unwrap();
        assert_eq!(reply.status, 200);
    })
    .await;
}

/// Case 6: beyond `max_connections` open connections, a new one gets 503 at once; once the
/// others close, connections are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_get_503() {
    bounded(60, async {
        let config = ServeConfig {
            max_connections: 2,
            ..llama_config()
        };
        let server = start(config).await;
        let idle_a = raw_send(server.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n").await;
        let idle_b = raw_send(server.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n").await;
        // The server has accepted both once a third connection is answered at all.
        let reply = server.client.get("/health").await.unwrap();
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert_eq!(reply.json()["error"]["type"], "overloaded_error");
        drop((idle_a, idle_b));
        let mut served = false;
        for _ in 0..200 {
            if server.client.get("/health").await.unwrap().status == 200 {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(served, "no connection served after the idle ones closed");
    })
    .await;
}

/// Case 6: shutdown ends even while a client holds a request open: requests in flight get
/// `shutdown_grace`, then every connection is closed and `serve` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_while_a_client_holds_a_request_open() {
    bounded(60, async {
        // Body and header timeouts far beyond the test's bound: the stalled request would
        // not end by itself within it.
        let config = ServeConfig {
            shutdown_grace: Duration::from_millis(200),
            body_timeout: Duration::from_secs(3600),
            header_timeout: Duration::from_secs(3600),
            ..llama_config()
        };
        let server = start_joinable(config).await;
        let mut stalled = raw_send(
            server.addr,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
        )
        .await;
        // The request is being read once an ordinary request on another connection returns.
        assert_eq!(server.client.get("/health").await.unwrap().status, 200);
        // Within the test's bound of 60 s, far below the hour the timeouts allow: only the
        // grace period can end it.
        let _ = server.stop.send(());
        server.task.await.unwrap().unwrap();
        // The held connection is closed too.
        read_until_closed(&mut stalled, 1 << 16).await;
    })
    .await;
}

/// Case 8: stop strings are capped in length (and count): a client cannot make every
/// generated token scan megabytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_are_capped_in_length_and_count() {
    bounded(120, async {
        let dir = tempfile::tempdir().unwrap();
        let config = ServeConfig {
            adapters: llama_adapters(),
            ..ServeConfig::new(llama_with_tokenizer(dir.path()).to_str().unwrap())
        };
        let server = start(config).await;
        let c = &server.client;
        let long = "t5 ".repeat(200);
        for stop in [json!(long), json!(["a", "b", "c", "d", "e"])] {
            let body = json!({"model": "base", "prompt": "t1 t2", "max_tokens": 4, "stop": stop});
            let reply = c.post("/v1/completions", &body).await.unwrap();
            assert_eq!(reply.status, 400, "{}", reply.text());
            assert_eq!(reply.json()["error"]["param"], "stop");
        }
        let body = json!({"model": "base", "prompt": "t1 t2", "max_tokens": 4, "stop": ["t9 t9"]});
        assert_eq!(c.post("/v1/completions", &body).await.unwrap().status, 200);
    })
    .await;
}

/// Case 10: a request timeout too long for `Instant + Duration` (as `--request-timeout
/// 18446744073709551615` gives) used to panic every handler; it means no limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_timeout_beyond_any_instant_means_no_limit() {
    bounded(120, async {
        let config = ServeConfig {
            request_timeout: Duration::MAX,
            ..llama_config()
        };
        let server = start(config).await;
        let reply = server
            .client
            .post("/v1/completions", &greedy("sql", &[1, 2], 3))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        let body = json!({"name": "x", "path": "y"});
        let reply = server.client.post("/v1/adapters", &body).await.unwrap();
        assert_eq!(reply.status, 403, "{}", reply.text());
    })
    .await;
}

/// Case 11: response ids are unique, also across restarts (they used to restart at
/// `cmpl-1`), every response carries `X-Request-Id` (the client's own when it sent one), and
/// nothing a client sees holds the server's absolute paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_unique_request_ids_echo_and_paths_stay_private() {
    bounded(120, async {
        let root = tempfile::tempdir().unwrap();
        let bundles = root.path().join("bundles");
        copy_bundle(&llama_adapters()[0].1, &bundles.join("sql"));
        std::fs::create_dir_all(bundles.join("broken")).unwrap();
        std::fs::write(bundles.join("broken/adapter_config.json"), b"{").unwrap();
        let config = || ServeConfig {
            adapters_dir: Some(bundles.clone()),
            ..ServeConfig::new(llama().to_str().unwrap())
        };
        let mut ids = Vec::new();
        for _ in 0..2 {
            let server = start(config()).await;
            for _ in 0..2 {
                let reply = server
                    .client
                    .post("/v1/completions", &greedy("base", &[1, 2], 2))
                    .await
                    .unwrap();
                assert_eq!(reply.status, 200);
                ids.push(reply.json()["id"].as_str().unwrap().to_string());
                assert!(reply.headers.contains_key("x-request-id"));
            }
        }
        let mut unique = ids.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ids.len(), "{ids:?}");

        let server = start(config()).await;
        let mut stream = raw_send(
            server.addr,
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Request-Id: trace-42\r\nConnection: close\r\n\r\n",
        )
        .await;
        let answer = String::from_utf8_lossy(&read_until_closed(&mut stream, 1 << 16).await)
            .to_ascii_lowercase();
        assert!(answer.contains("x-request-id: trace-42"), "{answer}");

        let c = &server.client;
        let loaded = c
            .post("/v1/adapters", &json!({"name": "sql", "path": "sql"}))
            .await
            .unwrap();
        assert_eq!(loaded.status, 201, "{}", loaded.text());
        let broken = c
            .post("/v1/adapters", &json!({"name": "broken", "path": "broken"}))
            .await
            .unwrap();
        assert_eq!(broken.status, 400, "{}", broken.text());
        let models = c.get("/v1/models").await.unwrap();
        let health = c.get("/health").await.unwrap();
        // The adapters folder, and the folder that holds the model folder.
        let secrets = [
            std::fs::canonicalize(root.path()).unwrap(),
            root.path().to_path_buf(),
            std::fs::canonicalize(llama().parent().unwrap()).unwrap(),
            llama().parent().unwrap().to_path_buf(),
        ];
        for reply in [&loaded, &broken, &models, &health] {
            let text = reply.text();
            for secret in &secrets {
                let secret = secret.display().to_string();
                assert!(!text.contains(&secret), "`{secret}` in {text}");
            }
        }
        assert_eq!(models.json()["data"][1]["root"], "sql");
        assert!(
            broken.text().contains("broken/adapter_config.json"),
            "{}",
            broken.text()
        );
    })
    .await;
}
