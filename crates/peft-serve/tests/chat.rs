//! `POST /v1/chat/completions` on loopback with the tiny Llama and a word-level tokenizer: the
//! reply is the completion of the conversation rendered with the model's chat template (one
//! body and streamed, OpenAI's chunk shapes), an adapter's own template wins over the base's,
//! stop tokens never show in the text, and bad conversations are 400s naming `messages`.

mod common;

use common::*;
use peft_serve::ServeConfig;
use serde_json::{Value, json};

/// `t1 <content> t2` per message, `t3` to prompt the assistant; eos `t2` (id 2, the model's).
const TEMPLATE: &str = "{% for m in messages %}{% if m.role == 'tool' %}\
{{ raise_exception('no tools here') }}{% endif %}t1 {{ m.content }} {{ eos_token }} {% endfor %}\
{% if add_generation_prompt %}t3{% endif %}";

/// The tiny Llama with a tokenizer and `template` in tokenizer_config.json.
fn chat_model(dir: &std::path::Path, template: &str) -> std::path::PathBuf {
    let model = llama_with_tokenizer(dir);
    let config = json!({"chat_template": template, "eos_token": "t2", "bos_token": "t1"});
    std::fs::write(model.join("tokenizer_config.json"), config.to_string()).unwrap();
    model
}

fn config(model: &std::path::Path) -> ServeConfig {
    ServeConfig {
        adapters: llama_adapters(),
        ..ServeConfig::new(model.to_str().unwrap())
    }
}

fn chat(model: &str, content: &str, max_tokens: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": content}],
           "max_tokens": max_tokens, "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_is_the_completion_of_the_templated_conversation() {
    bounded(180, async {
        let dir = tempfile::tempdir().unwrap();
        let server = start(config(&chat_model(dir.path(), TEMPLATE))).await;
        let c = &server.client;
        for adapter in ["base", "sql"] {
            let reply = c
                .post("/v1/chat/completions", &chat(adapter, "t5 t9", 6))
                .await
                .unwrap();
            assert_eq!(reply.status, 200, "{}", reply.text());
            let body = reply.json();
            assert_eq!(body["object"], "chat.completion");
            assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
            assert_eq!(body["choices"][0]["message"]["role"], "assistant");
            // "t1 t5 t9 t2 t3": the template's tokens, nothing added.
            assert_eq!(body["usage"]["prompt_tokens"], 5);
            let completion = c
                .post("/v1/completions", &greedy(adapter, &[1, 5, 9, 2, 3], 6))
                .await
                .unwrap();
            let completion = completion.json();
            assert_eq!(
                body["choices"][0]["message"]["content"], completion["choices"][0]["text"],
                "{adapter}"
            );
            assert_eq!(
                body["choices"][0]["finish_reason"],
                completion["choices"][0]["finish_reason"]
            );
            assert_eq!(
                body["usage"]["completion_tokens"],
                completion["usage"]["completion_tokens"]
            );

            // Streamed: the role first, then the content, then the finish reason, then usage.
            let mut request = chat(adapter, "t5 t9", 6);
            request["stream"] = json!(true);
            request["stream_options"] = json!({"include_usage": true});
            let streamed = c.post("/v1/chat/completions", &request).await.unwrap();
            assert_eq!(streamed.status, 200, "{}", streamed.text());
            let data = streamed.sse_data();
            assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
            let chunks: Vec<Value> = data[..data.len() - 1]
                .iter()
                .map(|d| serde_json::from_str(d).unwrap())
                .collect();
            assert!(
                chunks
                    .iter()
                    .all(|c| c["object"] == "chat.completion.chunk")
            );
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            let joined: String = chunks
                .iter()
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect();
            assert_eq!(
                joined,
                body["choices"][0]["message"]["content"].as_str().unwrap()
            );
            let finishes: Vec<&Value> = chunks
                .iter()
                .map(|c| &c["choices"][0]["finish_reason"])
                .filter(|f| !f.is_null())
                .collect();
            assert_eq!(finishes, [&body["choices"][0]["finish_reason"]]);
            let last = chunks.last().unwrap();
            assert_eq!(last["choices"], json!([]));
            assert_eq!(last["usage"], body["usage"]);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_with_its_own_template_uses_it() {
    bounded(120, async {
        let dir = tempfile::tempdir().unwrap();
        let model = chat_model(dir.path(), TEMPLATE);
        let own = dir.path().join("own");
        copy_bundle(&fixtures().join("mixed/llama_gqa/sql"), &own);
        std::fs::write(
            own.join("chat_template.jinja"),
            "t4 {% for m in messages %}{{ m.content }} {% endfor %}t3",
        )
        .unwrap();
        let server = start(ServeConfig {
            adapters: vec![
                ("own".into(), own),
                ("sql".into(), fixtures().join("mixed/llama_gqa/sql")),
            ],
            ..ServeConfig::new(model.to_str().unwrap())
        })
        .await;
        let c = &server.client;
        let own = c
            .post("/v1/chat/completions", &chat("own", "t5 t9", 2))
            .await
            .unwrap();
        assert_eq!(own.status, 200, "{}", own.text());
        assert_eq!(own.json()["usage"]["prompt_tokens"], 4, "t4 t5 t9 t3");
        let sql = c
            .post("/v1/chat/completions", &chat("sql", "t5 t9", 2))
            .await
            .unwrap();
        assert_eq!(
            sql.json()["usage"]["prompt_tokens"],
            5,
            "the base's template"
        );
    })
    .await;
}

/// A stop token (the end of sequence, or `stop_token_ids`) ends the reply and is never text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_tokens_never_show_in_the_text() {
    bounded(120, async {
        let dir = tempfile::tempdir().unwrap();
        let server = start(config(&chat_model(dir.path(), TEMPLATE))).await;
        let c = &server.client;
        let first = c
            .post("/v1/completions", &greedy("base", &[1, 5, 9, 2, 3], 1))
            .await
            .unwrap();
        let first = token_ids(&first)[0];
        let mut request = chat("base", "t5 t9", 6);
        request["stop_token_ids"] = json!([first]);
        let reply = c.post("/v1/chat/completions", &request).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        let body = reply.json();
        assert_eq!(body["choices"][0]["message"]["content"], "");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["completion_tokens"], 1);
        let mut request = greedy("base", &[1, 5, 9, 2, 3], 6);
        request["stop_token_ids"] = json!([first]);
        let reply = c.post("/v1/completions", &request).await.unwrap();
        assert_eq!(reply.json()["choices"][0]["text"], "");
        assert_eq!(token_ids(&reply), [first]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_conversations_are_400s_naming_the_field() {
    bounded(120, async {
        let dir = tempfile::tempdir().unwrap();
        let server = start(config(&chat_model(dir.path(), TEMPLATE))).await;
        let c = &server.client;
        let cases = [
            (
                json!({"model": "base", "messages": []}),
                "messages",
                "empty",
            ),
            (
                json!({"model": "base", "messages": [{"role": "user", "content": "t5"},
                                                     {"role": "tool", "content": "t6"}]}),
                "messages",
                "at message 1: no tools here",
            ),
            (
                json!({"model": "base", "messages": [{"content": "t5"}]}),
                "messages[0]",
                "role",
            ),
            (
                json!({"model": "base", "messages": [{"role": "user", "content": "t5"}],
                       "max_completion_tokens": 1000}),
                "max_completion_tokens",
                "max_completion_tokens",
            ),
            (
                json!({"model": "base", "messages": [{"role": "user", "content": "t5"}],
                       "temperature": -1}),
                "temperature",
                "temperature",
            ),
            (
                json!({"model": "base", "messages": [{"role": "user", "content": "t5"}],
                       "chat_template_kwargs": {"messages": []}}),
                "chat_template_kwargs",
                "set by the server",
            ),
        ];
        for (request, param, needle) in cases {
            let reply = c.post("/v1/chat/completions", &request).await.unwrap();
            assert_eq!(reply.status, 400, "{request}: {}", reply.text());
            let error = &reply.json()["error"];
            assert_eq!(error["param"], param, "{request}: {error}");
            assert!(
                error["message"].as_str().unwrap().contains(needle),
                "{error}"
            );
        }
        let unknown = c
            .post("/v1/chat/completions", &chat("nope", "t5", 2))
            .await
            .unwrap();
        assert_eq!(unknown.status, 404, "{}", unknown.text());
        // Without a template (no tokenizer_config.json): a 400 that says so and where to go.
        drop(server);
        let plain = start(config(&llama_with_tokenizer(&dir.path().join("plain")))).await;
        let reply = plain
            .client
            .post("/v1/chat/completions", &chat("base", "t5", 2))
            .await
            .unwrap();
        assert_eq!(reply.status, 400);
        assert!(
            reply.text().contains("no chat template"),
            "{}",
            reply.text()
        );
    })
    .await;
}
