//! Every endpoint of `burn-peft serve` on loopback: completions (one body and streamed) equal
//! the library's own generation with the same adapter, text prompts and stop strings,
//! embeddings and classification equal a direct forward, models / adapters / health /
//! metrics, the API key, and the bad-input statuses.

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::*;
use peft_core::PeftModel;
use peft_models::{GenerationConfig, ModelInputs, Task, from_pretrained, generate};
use peft_serve::ServeConfig;
use serde_json::json;

/// What the library generates with `adapter` active (`None`: base), new tokens only.
fn library_generate(adapter: Option<&str>, prompt: &[i64], max_new: usize) -> Vec<i64> {
    let device = Device::flex();
    let pretrained = from_pretrained(llama().to_str().unwrap(), Task::CausalLm, &device).unwrap();
    let mut model = PeftModel::new(pretrained.model);
    if let Some(name) = adapter {
        let (_, dir) = llama_adapters()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap();
        model.load_adapter(&dir, name).unwrap();
    }
    let config = GenerationConfig {
        max_new_tokens: max_new,
        eos_token_ids: vec![2],
        ..Default::default()
    };
    generate(model.model(), prompt, &config, &device).unwrap()[prompt.len()..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_models_health_and_metrics() {
    bounded(120, async {
        let server = start(llama_config()).await;
        let c = &server.client;
        let prompt = [5, 9, 17, 3, 44];
        for adapter in [None, Some("sql"), Some("table")] {
            let reply = c
                .post(
                    "/v1/completions",
                    &greedy(adapter.unwrap_or("base"), &prompt, 8),
                )
                .await
                .unwrap();
            assert_eq!(reply.status, 200, "{}", reply.text());
            let body = reply.json();
            assert_eq!(body["object"], "text_completion");
            assert_eq!(body["model"], adapter.unwrap_or("base"));
            let ids = token_ids(&reply);
            assert_eq!(ids, library_generate(adapter, &prompt, 8), "{adapter:?}");
            let finish = body["choices"][0]["finish_reason"].as_str().unwrap();
            assert_eq!(finish, if ids.len() == 8 { "length" } else { "stop" });
            assert_eq!(body["usage"]["prompt_tokens"], 5);
            assert_eq!(body["usage"]["completion_tokens"], ids.len());
        }

        let models = c.get("/v1/models").await.unwrap();
        assert_eq!(models.status, 200);
        let ids: Vec<String> = models.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, ["base", "sql", "chat", "lora", "table"]);
        assert_eq!(models.json()["data"][4]["peft_type"], "PREFIX_TUNING");

        let health = c.get("/health").await.unwrap();
        assert_eq!(
            (health.status, health.json()["status"].clone()),
            (200, json!("ok"))
        );

        let metrics = c.get("/metrics").await.unwrap();
        assert_eq!(metrics.status, 200);
        let text = metrics.text();
        for needle in [
            "burn_peft_requests_total{endpoint=\"completions\",status=\"200\"} 3",
            "burn_peft_request_duration_seconds_bucket{endpoint=\"completions\"",
            "burn_peft_batch_size_count",
            "burn_peft_queue_depth 0",
            "burn_peft_adapters_loaded 4",
            "burn_peft_generated_tokens_total",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_sends_the_tokens_of_the_single_answer() {
    bounded(120, async {
        let server = start(llama_config()).await;
        let c = &server.client;
        let prompt = [8, 21, 3];
        let whole = c
            .post("/v1/completions", &greedy("chat", &prompt, 10))
            .await
            .unwrap();
        let mut request = greedy("chat", &prompt, 10);
        request["stream"] = json!(true);
        let streamed = c.post("/v1/completions", &request).await.unwrap();
        assert_eq!(streamed.status, 200);
        assert!(
            streamed.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let data = streamed.sse_data();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let ids: Vec<i64> = chunks
            .iter()
            .flat_map(|c| c["choices"][0]["token_ids"].as_array().unwrap().clone())
            .map(|t| t.as_i64().unwrap())
            .collect();
        assert_eq!(ids, token_ids(&whole));
        let last = chunks.last().unwrap();
        assert_eq!(
            last["choices"][0]["finish_reason"],
            whole.json()["choices"][0]["finish_reason"]
        );
        assert_eq!(last["usage"], whole.json()["usage"]);
        assert!(
            chunks[..chunks.len() - 1]
                .iter()
                .all(|c| c["choices"][0]["finish_reason"].is_null())
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_prompts_and_stop_strings() {
    bounded(120, async {
        let dir = tempfile::tempdir().unwrap();
        let model = llama_with_tokenizer(dir.path());
        let server = start(ServeConfig::new(model.to_str().unwrap())).await;
        let c = &server.client;
        let request = json!({"model": "base", "prompt": "t5 t9 t17", "max_tokens": 12,
                             "temperature": 0});
        let reply = c.post("/v1/completions", &request).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        let ids = token_ids(&reply);
        assert_eq!(ids, library_generate(None, &[5, 9, 17], 12));
        let text = reply.json()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string();
        let words: Vec<String> = ids
            .iter()
            .take_while(|&&t| t != 2)
            .map(|t| format!("t{t}"))
            .collect();
        assert_eq!(text.split_whitespace().collect::<Vec<_>>(), words);
        assert!(words.len() >= 3, "{words:?}");
        // Stop before the third generated word: the text ends before it, in one body and in a
        // stream.
        let stop = format!(" {}", words[2]);
        let cut = text.find(&stop).unwrap();
        let mut with_stop = request.clone();
        with_stop["stop"] = json!([stop]);
        let reply = c.post("/v1/completions", &with_stop).await.unwrap();
        let body = reply.json();
        assert_eq!(body["choices"][0]["text"], text[..cut]);
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        with_stop["stream"] = json!(true);
        let streamed = c.post("/v1/completions", &with_stop).await.unwrap();
        let data = streamed.sse_data();
        let joined: String = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap())
            .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(joined, text[..cut]);
    })
    .await;
}

fn bert_inputs(ids: &[i64], device: &Device) -> ModelInputs {
    let t = |v: Vec<i64>| Tensor::<2, Int>::from_data(TensorData::new(v, [1, ids.len()]), device);
    ModelInputs {
        input_ids: t(ids.to_vec()),
        attention_mask: Some(t(vec![1; ids.len()])),
        token_type_ids: Some(t(vec![0; ids.len()])),
        pixel_values: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_and_classification_equal_a_direct_forward() {
    bounded(120, async {
        let device = Device::flex();
        let inputs = [vec![2i64, 7, 9, 4, 3], vec![2, 11, 3]];
        // Embeddings: BERT encoder with its LoRA fixture.
        let bert = fixtures().join("models/bert");
        let config = ServeConfig {
            adapters: vec![("lora".into(), bert.join("lora"))],
            ..ServeConfig::new(bert.to_str().unwrap())
        };
        let server = start(config).await;
        let request = json!({"model": "lora", "input": inputs});
        let reply = server
            .client
            .post("/v1/embeddings", &request)
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        let pretrained = from_pretrained(bert.to_str().unwrap(), Task::Encoder, &device).unwrap();
        let mut model = PeftModel::new(pretrained.model);
        model.load_adapter(bert.join("lora"), "lora").unwrap();
        for (i, ids) in inputs.iter().enumerate() {
            let out = model.model().forward(&bert_inputs(ids, &device)).unwrap();
            let want = out
                .sentence_embedding
                .unwrap()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            let got: Vec<f32> = reply.json()["data"][i]["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let diff = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-5, "embedding {i}: {diff}");
        }
        assert_eq!(reply.json()["usage"]["prompt_tokens"], 8);
        // `encoding_format: base64` (the OpenAI SDK's default): the same numbers as
        // little-endian f32 bytes.
        let request = json!({"model": "lora", "input": inputs, "encoding_format": "base64"});
        let packed = server
            .client
            .post("/v1/embeddings", &request)
            .await
            .unwrap();
        assert_eq!(packed.status, 200, "{}", packed.text());
        for i in 0..inputs.len() {
            let text = packed.json()["data"][i]["embedding"]
                .as_str()
                .unwrap()
                .to_string();
            let bytes = base64_decode(&text);
            let unpacked: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let floats: Vec<f32> = reply.json()["data"][i]["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(unpacked, floats, "embedding {i}");
        }
        let request = json!({"model": "lora", "input": inputs, "encoding_format": "int8"});
        let bad = server
            .client
            .post("/v1/embeddings", &request)
            .await
            .unwrap();
        assert_eq!(bad.status, 400);
        assert_eq!(bad.json()["error"]["param"], "encoding_format");
        // A completion on an encoder is a 400 that says where to go.
        let wrong = server
            .client
            .post("/v1/completions", &greedy("base", &[1, 2], 2))
            .await;
        let wrong = wrong.unwrap();
        assert_eq!(wrong.status, 400);
        assert!(wrong.text().contains("/v1/embeddings"), "{}", wrong.text());
        drop(server);

        // Classification: BERT classifier, two adapters with their own heads in one batch.
        let cls = fixtures().join("models/bert_cls");
        let adapters = ["sql", "chat"];
        let config = ServeConfig {
            adapters: adapters
                .iter()
                .map(|a| (a.to_string(), fixtures().join("mixed/bert_cls").join(a)))
                .collect(),
            ..ServeConfig::new(cls.to_str().unwrap())
        };
        let server = start(config).await;
        let c = server.client.clone();
        let requests = adapters.map(|a| {
            let c = c.clone();
            let body = json!({"model": a, "input": inputs});
            tokio::spawn(async move { c.post("/v1/classify", &body).await.unwrap() })
        });
        let task = Task::SequenceClassification { num_labels: 3 };
        for (adapter, request) in adapters.iter().zip(requests) {
            let reply = request.await.unwrap();
            assert_eq!(reply.status, 200, "{}", reply.text());
            let pretrained = from_pretrained(cls.to_str().unwrap(), task, &device).unwrap();
            let mut model = PeftModel::new(pretrained.model);
            model
                .load_adapter(fixtures().join("mixed/bert_cls").join(adapter), adapter)
                .unwrap();
            for (i, ids) in inputs.iter().enumerate() {
                let out = model.model().forward(&bert_inputs(ids, &device)).unwrap();
                let logits = out
                    .class_logits
                    .unwrap()
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap();
                let item = &reply.json()["data"][i];
                let probs: Vec<f32> = item["probs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect();
                let want = peft_serve_softmax(&logits);
                let diff = want
                    .iter()
                    .zip(&probs)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(diff < 1e-5, "{adapter} input {i}: {diff}");
                let best = (0..3).max_by(|&a, &b| want[a].total_cmp(&want[b])).unwrap();
                assert_eq!(item["label"], format!("LABEL_{best}"));
                assert_eq!(item["num_classes"], 3);
            }
        }
    })
    .await;
}

fn peft_serve_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    exp.iter().map(|e| e / total).collect()
}

/// Standard base64 (RFC 4648, padded), decoded without a dependency.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::new();
    for chunk in text.trim_end_matches('=').as_bytes().chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &c)| n | (u32::from(value(c)) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}
