//! Bad input never takes the server down: each case gets its exact status and a JSON error
//! naming the field, and the server answers the next request normally.

mod common;

use std::time::Duration;

use common::*;
use peft_serve::ServeConfig;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_exact_statuses() {
    bounded(120, async {
        let config = ServeConfig {
            max_body_bytes: 4096,
            ..llama_config()
        };
        let server = start(config).await;
        let c = &server.client;
        let check = |reply: &peft_serve::client::Reply, status: u16, param: Option<&str>| {
            assert_eq!(reply.status, status, "{}", reply.text());
            let error = &reply.json()["error"];
            assert_eq!(error["code"], status, "{}", reply.text());
            assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
            if let Some(param) = param {
                assert_eq!(error["param"], param, "{}", reply.text());
            }
        };
        // Malformed JSON.
        let reply = c
            .post_raw("/v1/completions", b"{\"model\": \"base\", ".to_vec())
            .await;
        check(&reply.unwrap(), 400, None);
        // Wrong types name the field.
        let reply = c
            .post(
                "/v1/completions",
                &json!({"model": "base", "prompt": [1, 2], "max_tokens": "many"}),
            )
            .await
            .unwrap();
        check(&reply, 400, Some("max_tokens"));
        let reply = c
            .post(
                "/v1/completions",
                &json!({"model": "base", "prompt": {"a": 1}}),
            )
            .await
            .unwrap();
        check(&reply, 400, Some("prompt"));
        let reply = c
            .post("/v1/completions", &json!({"prompt": [1]}))
            .await
            .unwrap();
        check(&reply, 400, None);
        assert!(reply.text().contains("model"), "{}", reply.text());
        // Out-of-range values.
        for (field, value) in [
            ("temperature", json!(-1)),
            ("top_p", json!(1.5)),
            ("max_tokens", json!(0)),
        ] {
            let mut body = greedy("base", &[1, 2], 4);
            body[field] = value;
            let reply = c.post("/v1/completions", &body).await.unwrap();
            check(&reply, 400, Some(field));
        }
        let reply = c
            .post("/v1/completions", &greedy("base", &[1, 500], 4))
            .await
            .unwrap();
        check(&reply, 400, Some("prompt"));
        let reply = c
            .post("/v1/completions", &greedy("base", &[], 4))
            .await
            .unwrap();
        check(&reply, 400, Some("prompt"));
        // Text without a tokenizer, stop strings without one.
        let reply = c
            .post(
                "/v1/completions",
                &json!({"model": "base", "prompt": "hello"}),
            )
            .await
            .unwrap();
        check(&reply, 400, Some("prompt"));
        // Unknown adapter: 404 listing the loaded ones.
        let reply = c
            .post("/v1/completions", &greedy("sqll", &[1, 2], 4))
            .await
            .unwrap();
        check(&reply, 404, Some("model"));
        for name in ["base", "sql", "chat", "lora", "table"] {
            assert!(reply.text().contains(name), "{}", reply.text());
        }
        // Too long for the model's 64 positions: the prompt, or prompt + max_tokens; with a
        // prefix adapter, its 5 virtual tokens count.
        let long: Vec<i64> = (0..70).map(|i| i % 100 + 3).collect();
        let reply = c
            .post("/v1/completions", &greedy("base", &long, 1))
            .await
            .unwrap();
        check(&reply, 400, Some("prompt"));
        let reply = c
            .post("/v1/completions", &greedy("base", &long[..40], 30))
            .await
            .unwrap();
        check(&reply, 400, Some("max_tokens"));
        assert_eq!(
            c.post("/v1/completions", &greedy("base", &long[..40], 24))
                .await
                .unwrap()
                .status,
            200
        );
        let reply = c
            .post("/v1/completions", &greedy("table", &long[..40], 24))
            .await
            .unwrap();
        check(&reply, 400, Some("max_tokens"));
        // Body over the limit.
        let big = greedy("base", &vec![3; 3000], 1);
        let reply = c.post("/v1/completions", &big).await.unwrap();
        check(&reply, 413, None);
        // The wrong endpoint for this model, an unknown route.
        let reply = c
            .post("/v1/embeddings", &json!({"model": "base", "input": [1, 2]}))
            .await
            .unwrap();
        check(&reply, 400, None);
        let reply = c.get("/v1/nothing").await.unwrap();
        check(&reply, 404, None);
        // Adapter management: bad names, runtime loading off without --adapters-dir,
        // unloading what is not loaded or the base model.
        let reply = c
            .post("/v1/adapters", &json!({"name": "a/b", "path": "x"}))
            .await
            .unwrap();
        check(&reply, 400, Some("name"));
        let reply = c
            .post("/v1/adapters", &json!({"name": "sql", "path": "x"}))
            .await
            .unwrap();
        check(&reply, 409, None);
        let reply = c
            .post("/v1/adapters", &json!({"name": "new", "path": "x"}))
            .await
            .unwrap();
        check(&reply, 403, None);
        check(&c.delete("/v1/adapters/nope").await.unwrap(), 404, None);
        check(&c.delete("/v1/adapters/base").await.unwrap(), 400, None);
        // Still serving.
        let reply = c
            .post("/v1/completions", &greedy("sql", &[1, 2], 3))
            .await
            .unwrap();
        assert_eq!(reply.status, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_set_and_timeouts_answer_408() {
    bounded(120, async {
        let config = ServeConfig {
            api_key: Some("s3cret".into()),
            ..llama_config()
        };
        let server = start(config).await;
        let request = greedy("base", &[1, 2], 2);
        let no_key = server
            .client
            .post("/v1/completions", &request)
            .await
            .unwrap();
        assert_eq!(no_key.status, 401);
        let wrong = server.client.clone().with_api_key("s3creT");
        assert_eq!(
            wrong
                .post("/v1/completions", &request)
                .await
                .unwrap()
                .status,
            401
        );
        assert_eq!(wrong.get("/v1/models").await.unwrap().status, 401);
        assert_eq!(wrong.get("/metrics").await.unwrap().status, 401);
        // Health checks need no key.
        assert_eq!(server.client.get("/health").await.unwrap().status, 200);
        let right = server.client.clone().with_api_key("s3cret");
        assert_eq!(
            right
                .post("/v1/completions", &request)
                .await
                .unwrap()
                .status,
            200
        );
        drop(server);

        let config = ServeConfig {
            request_timeout: Duration::from_millis(1),
            ..llama_config()
        };
        let server = start(config).await;
        let reply = server
            .client
            .post("/v1/completions", &greedy("sql", &[1, 2, 3], 50))
            .await
            .unwrap();
        assert_eq!(reply.status, 408, "{}", reply.text());
    })
    .await;
}
