//! Unit tests of the data module.

use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor};
use peft_models::HfTokenizer;
use serde_json::Value;

use super::*;

/// A tiny BERT-like word-level tokenizer: `[CLS] a [SEP]` / `[CLS] a [SEP] b [SEP]`.
const VOCAB: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "game", "was", "fun", "movie", "bad", "good", "is",
    "what", "capital", "of", "france", "paris", "?", "a", "b", "c", "d", "e",
];

fn tokenizer_json(post_processor: Value) -> String {
    let vocab: serde_json::Map<String, Value> = VOCAB
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), Value::from(i)))
        .collect();
    let added: Vec<Value> = VOCAB[..4]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": post_processor,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
    .to_string()
}

fn bert_post() -> Value {
    let special = |t: &str| serde_json::json!({"SpecialToken": {"id": t, "type_id": 0}});
    let special1 = |t: &str| serde_json::json!({"SpecialToken": {"id": t, "type_id": 1}});
    serde_json::json!({
        "type": "TemplateProcessing",
        "single": [special("[CLS]"), {"Sequence": {"id": "A", "type_id": 0}}, special("[SEP]")],
        "pair": [special("[CLS]"), {"Sequence": {"id": "A", "type_id": 0}}, special("[SEP]"),
                 {"Sequence": {"id": "B", "type_id": 1}}, special1("[SEP]")],
        "special_tokens": {
            "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
            "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
        }
    })
}

/// Llama-like: a beginning-of-sequence token only.
fn bos_post() -> Value {
    serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}}
    })
}

fn tokenizer(dir: &Path, post: Value) -> HfTokenizer {
    let file = dir.join("tokenizer.json");
    fs::write(&file, tokenizer_json(post)).unwrap();
    HfTokenizer::from_file(&file).unwrap()
}

fn id(t: &str) -> i64 {
    VOCAB.iter().position(|v| *v == t).unwrap() as i64
}

fn ids(ts: &str) -> Vec<i64> {
    ts.split_whitespace().map(id).collect()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

fn load(
    path: &Path,
    task: TaskKind,
    tok: &HfTokenizer,
    map: Option<&LabelMap>,
) -> Result<(Vec<Example>, Option<LabelMap>), DataError> {
    load_examples(path, task, &DataConfig::default(), tok, None, map)
}

#[test]
fn jsonl_classification_string_labels_and_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), bert_post());
    let p = write(
        dir.path(),
        "train.jsonl",
        concat!(
            "{\"text\": \"the game was fun\", \"label\": \"games\"}\n",
            "\n",
            "{\"text\": \"the movie\", \"text_pair\": \"was bad\", \"label\": \"movies\"}\n",
            "{\"text\": \"good\", \"text_pair\": null, \"label\": \"books\"}\n",
        ),
    );
    let (ex, map) = load(&p, TaskKind::Classification, &tok, None).unwrap();
    let map = map.unwrap();
    assert_eq!(map.names, ["books", "games", "movies"]);
    assert_eq!(ex.len(), 3);
    assert_eq!(ex[0].input_ids, ids("[CLS] the game was fun [SEP]"));
    assert_eq!(ex[0].token_type_ids, vec![0; 6]);
    assert_eq!(ex[0].label, Some(1));
    assert_eq!(ex[0].labels, None);
    assert_eq!(ex[1].input_ids, ids("[CLS] the movie [SEP] was bad [SEP]"));
    assert_eq!(ex[1].token_type_ids, [0, 0, 0, 0, 1, 1, 1]);
    assert_eq!(ex[1].label, Some(2));
    assert_eq!(ex[2].input_ids, ids("[CLS] good [SEP]"));
    assert_eq!(ex[2].label, Some(0));

    // Saved and loaded back, then used for another file.
    let mp = dir.path().join(LABEL_MAP_FILE);
    map.save(&mp).unwrap();
    let json: Value = serde_json::from_str(&fs::read_to_string(&mp).unwrap()).unwrap();
    assert_eq!(json["id2label"]["0"], "books");
    assert_eq!(json["label2id"]["movies"], 2);
    let back = LabelMap::load(&mp).unwrap();
    assert_eq!(back, map);
    let eval = write(
        dir.path(),
        "eval.jsonl",
        "{\"text\": \"fun\", \"label\": \"movies\"}\n",
    );
    let (ex, m) = load(&eval, TaskKind::Classification, &tok, Some(&back)).unwrap();
    assert_eq!(ex[0].label, Some(2));
    assert_eq!(m.unwrap(), map);
}

#[test]
fn integer_labels_map_to_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), bert_post());
    let p = write(
        dir.path(),
        "train.jsonl",
        "{\"text\": \"a\", \"label\": 2}\n{\"text\": \"b\", \"label\": 0}\n{\"text\": \"c\", \"label\": 10}\n",
    );
    let (ex, map) = load(&p, TaskKind::Classification, &tok, None).unwrap();
    let map = map.unwrap();
    assert_eq!(map.len(), 11);
    assert_eq!(map.name(10), Some("10"));
    let got: Vec<_> = ex.iter().map(|e| e.label.unwrap()).collect();
    assert_eq!(got, [2, 0, 10]);
}

#[test]
fn csv_classification_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), bert_post());
    // Integer-like strings in CSV map to themselves; quoted commas; an empty pair cell.
    let p = write(
        dir.path(),
        "train.csv",
        "text,text_pair,label\n\"the game, fun\",,1\nthe movie,was bad,0\n\ngood,,1\n",
    );
    let (ex, map) = load(&p, TaskKind::Classification, &tok, None).unwrap();
    assert_eq!(map.unwrap().names, ["0", "1"]);
    assert_eq!(ex.len(), 3);
    assert_eq!(ex[0].input_ids, ids("[CLS] the game [UNK] fun [SEP]"));
    assert_eq!(ex[0].label, Some(1));
    assert_eq!(ex[1].input_ids, ids("[CLS] the movie [SEP] was bad [SEP]"));
    assert_eq!(ex[1].token_type_ids, [0, 0, 0, 0, 1, 1, 1]);
    assert_eq!(ex[1].label, Some(0));

    // String labels in CSV, custom field names, explicit format, truncation.
    let p = write(
        dir.path(),
        "data.txt",
        "sentence,y\nthe game was fun,pos\nbad,neg\n",
    );
    let cfg = DataConfig {
        format: Some("csv".into()),
        text_field: "sentence".into(),
        text_pair_field: None,
        label_field: "y".into(),
        max_length: 3,
        ..DataConfig::default()
    };
    let (ex, map) = load_examples(&p, TaskKind::Classification, &cfg, &tok, None, None).unwrap();
    assert_eq!(map.unwrap().names, ["neg", "pos"]);
    // transformers' truncation: the special tokens stay, the text is cut.
    assert_eq!(ex[0].input_ids, ids("[CLS] the [SEP]"));
    assert_eq!(ex[0].label, Some(1));
}

#[test]
fn malformed_rows_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), bert_post());
    let cases = [
        (
            "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": \"b\", \"label\": 1\n",
            "invalid JSON",
        ),
        (
            "{\"text\": \"a\", \"label\": 0}\n\n{\"label\": 1}\n",
            "missing field `text`",
        ),
        (
            "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": 3, \"label\": 1}\n",
            "must be a string",
        ),
        (
            "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": \" \", \"label\": 1}\n",
            "is empty",
        ),
        (
            "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": \"b\", \"label\": -1}\n",
            "non-negative",
        ),
        (
            "{\"text\": \"a\", \"label\": 0}\n\n{\"text\": \"b\"}\n",
            "missing field `label`",
        ),
        (
            "{\"text\": \"a\", \"label\": 0}\n\n[1, 2]\n",
            "expected a JSON object",
        ),
    ];
    for (text, why) in cases {
        let p = write(dir.path(), "train.jsonl", text);
        let err = load(&p, TaskKind::Classification, &tok, None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::Malformed { line: 3, .. }), "{msg}");
        assert!(msg.contains("train.jsonl:3: "), "{msg}");
        assert!(msg.contains(why), "{msg}");
    }
    let p = write(dir.path(), "train.csv", "text,label\na,0\nb\n");
    let msg = load(&p, TaskKind::Classification, &tok, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("train.csv:3: "), "{msg}");
    let p = write(dir.path(), "train.csv", "text,label\na,0\n,1\n");
    let msg = load(&p, TaskKind::Classification, &tok, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("train.csv:3: missing field `text`"), "{msg}");

    let p = write(dir.path(), "empty.jsonl", "\n\n");
    let err = load(&p, TaskKind::Classification, &tok, None).unwrap_err();
    assert!(matches!(err, DataError::Empty { .. }), "{err}");
    let p = write(dir.path(), "x.parquet", "");
    let err = load(&p, TaskKind::Classification, &tok, None).unwrap_err();
    assert!(matches!(err, DataError::UnsupportedFormat { .. }), "{err}");
    let err = load(
        &dir.path().join("nope.jsonl"),
        TaskKind::Classification,
        &tok,
        None,
    )
    .unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err}");
}

#[test]
fn unknown_label_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), bert_post());
    let map = LabelMap::from_labels(["neg", "pos"]);
    let p = write(
        dir.path(),
        "eval.jsonl",
        "{\"text\": \"a\", \"label\": \"pos\"}\n{\"text\": \"b\", \"label\": \"meh\"}\n",
    );
    let err = load(&p, TaskKind::Classification, &tok, Some(&map)).unwrap_err();
    match &err {
        DataError::UnknownLabel {
            line, label, known, ..
        } => {
            assert_eq!((*line, label.as_str()), (2, "meh"));
            assert_eq!(known, &["neg", "pos"]);
        }
        e => panic!("{e}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("eval.jsonl:2: unknown label `meh`; known labels: neg, pos"),
        "{msg}"
    );
}

#[test]
fn label_map_load_validates() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "m.json",
        "{\"id2label\": {\"0\": \"a\", \"2\": \"b\"}}",
    );
    assert!(LabelMap::load(&p).is_err());
    let p = write(
        dir.path(),
        "m.json",
        "{\"id2label\": {\"1\": \"b\", \"0\": \"a\"}, \"label2id\": {\"a\": 0, \"b\": 1}}",
    );
    assert_eq!(LabelMap::load(&p).unwrap().names, ["a", "b"]);
    let p = write(
        dir.path(),
        "m.json",
        "{\"id2label\": {\"0\": \"a\", \"1\": \"b\"}, \"label2id\": {\"a\": 1}}",
    );
    assert!(LabelMap::load(&p).is_err());
}

#[test]
fn causal_lm_prompt_completion_masks_the_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "train.jsonl",
        concat!(
            "{\"prompt\": \"what is the capital of france ?\", \"completion\": \"paris\"}\n",
            "{\"text\": \"the game was fun\"}\n",
            "{\"prompt\": \"\", \"completion\": \"paris\"}\n",
        ),
    );
    // BERT-like: [CLS] and [SEP] once around the whole, loss on the completion and [SEP].
    let tok = tokenizer(dir.path(), bert_post());
    let (ex, map) = load(&p, TaskKind::CausalLm, &tok, None).unwrap();
    assert!(map.is_none());
    assert_eq!(
        ex[0].input_ids,
        ids("[CLS] what is the capital of france ? paris [SEP]")
    );
    let mut want = vec![IGNORE_INDEX; 8];
    want.extend(ids("paris [SEP]"));
    assert_eq!(ex[0].labels.as_ref().unwrap(), &want);
    assert_eq!(ex[0].token_type_ids, vec![0; 10]);
    assert_eq!(ex[0].label, None);
    // Plain text: no mask.
    assert_eq!(ex[1].input_ids, ids("[CLS] the game was fun [SEP]"));
    assert_eq!(ex[1].labels.as_ref().unwrap(), &ex[1].input_ids);
    assert_eq!(ex[2].input_ids, ids("[CLS] paris [SEP]"));
    assert_eq!(
        ex[2].labels.as_ref().unwrap(),
        &[IGNORE_INDEX, id("paris"), id("[SEP]")]
    );

    // Llama-like: one leading BOS, not repeated before the completion.
    let tok = tokenizer(dir.path(), bos_post());
    let (ex, _) = load(&p, TaskKind::CausalLm, &tok, None).unwrap();
    assert_eq!(
        ex[0].input_ids,
        ids("[CLS] what is the capital of france ? paris")
    );
    let mut want = vec![IGNORE_INDEX; 8];
    want.push(id("paris"));
    assert_eq!(ex[0].labels.as_ref().unwrap(), &want);

    // GPT-2-like: no special tokens at all.
    let tok = tokenizer(dir.path(), Value::Null);
    let (ex, _) = load(&p, TaskKind::CausalLm, &tok, None).unwrap();
    assert_eq!(
        ex[0].input_ids,
        ids("what is the capital of france ? paris")
    );
    assert_eq!(ex[0].labels.as_ref().unwrap()[..7], [IGNORE_INDEX; 7]);

    // Truncation cuts the joined row.
    let cfg = DataConfig {
        max_length: 4,
        ..DataConfig::default()
    };
    let tok = tokenizer(dir.path(), bert_post());
    let (ex, _) = load_examples(&p, TaskKind::CausalLm, &cfg, &tok, None, None).unwrap();
    assert_eq!(ex[0].input_ids.len(), 4);
    assert_eq!(ex[0].labels.as_ref().unwrap(), &[IGNORE_INDEX; 4]);
    assert_eq!(ex[1].input_ids, ids("[CLS] the game [SEP]"));

    // A completion without a prompt is malformed.
    let p = write(dir.path(), "bad.jsonl", "{\"completion\": \"paris\"}\n");
    let msg = load(&p, TaskKind::CausalLm, &tok, None)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("bad.jsonl:1: "), "{msg}");
}

#[test]
fn epoch_order_is_a_seeded_permutation() {
    let a = epoch_order(100, 42, 0);
    assert_eq!(a, epoch_order(100, 42, 0));
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    assert_ne!(a, (0..100).collect::<Vec<_>>());
    assert_ne!(a, epoch_order(100, 42, 1));
    assert_ne!(a, epoch_order(100, 43, 0));
    assert_eq!(epoch_order(0, 1, 0), Vec::<usize>::new());
    assert_eq!(epoch_order(1, 1, 0), vec![0]);
}

fn vec2(t: Tensor<2, Int>) -> (Vec<usize>, Vec<i64>) {
    let dims = t.dims().to_vec();
    (dims, t.into_data().iter::<i64>().collect())
}

#[test]
fn collate_pads_right() {
    let device = Device::flex();
    let a = Example {
        input_ids: vec![2, 4, 5, 3],
        token_type_ids: vec![0, 0, 1, 1],
        label: Some(1),
        labels: None,
        line: 0,
        segments: Vec::new(),
        image: None,
    };
    let b = Example {
        input_ids: vec![2, 3],
        token_type_ids: vec![0, 0],
        label: Some(0),
        labels: None,
        line: 0,
        segments: Vec::new(),
        image: None,
    };
    let c = collate(&[&a, &b], 0, &device);
    assert_eq!(
        vec2(c.input_ids),
        (vec![2, 4], vec![2, 4, 5, 3, 2, 3, 0, 0])
    );
    assert_eq!(vec2(c.attention_mask).1, [1, 1, 1, 1, 1, 1, 0, 0]);
    assert_eq!(vec2(c.token_type_ids).1, [0, 0, 1, 1, 0, 0, 0, 0]);
    let labels = c.labels.unwrap();
    assert_eq!(labels.dims(), [2]);
    assert_eq!(labels.into_data().iter::<i64>().collect::<Vec<_>>(), [1, 0]);
    assert!(c.lm_labels.is_none());
    assert_eq!(c.tokens, 6);

    let lm = |ids: Vec<i64>, labels: Vec<i64>| Example {
        token_type_ids: vec![0; ids.len()],
        input_ids: ids,
        label: None,
        labels: Some(labels),
        line: 0,
        segments: Vec::new(),
        image: None,
    };
    let x = lm(vec![7, 8], vec![-100, 8]);
    let y = lm(vec![7, 8, 9], vec![7, 8, 9]);
    let c = collate(&[&x, &y], 5, &device);
    assert_eq!(vec2(c.input_ids), (vec![2, 3], vec![7, 8, 5, 7, 8, 9]));
    assert_eq!(vec2(c.lm_labels.unwrap()).1, [-100, 8, -100, 7, 8, 9]);
    assert!(c.labels.is_none());
    assert_eq!(c.tokens, 5);
}

/// `[CLS] role content [SEP]` per message, `[CLS] a` to prompt the assistant ("a" stands
/// for the assistant's role word).
fn chat_template() -> peft_models::chat::ChatTemplate {
    peft_models::chat::ChatTemplate::new(
        "test",
        "{% for m in messages %}[CLS] {{ 'a' if m.role == 'assistant' else 'b' }} {{ m.content }} \
         {{ eos_token }} {% endfor %}{% if add_generation_prompt %}[CLS] a {% endif %}",
        [("eos_token", "[SEP]")],
    )
    .unwrap()
}

/// The tokens an example takes the loss on.
fn targets(example: &Example) -> Vec<i64> {
    let labels = example.labels.as_ref().unwrap();
    labels
        .iter()
        .copied()
        .filter(|&l| l != IGNORE_INDEX)
        .collect()
}

#[test]
fn conversations_train_on_the_assistant_turns_only() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), Value::Null);
    let template = chat_template();
    let p = write(
        dir.path(),
        "chat.jsonl",
        concat!(
            r#"{"messages": [{"role": "system", "content": "the game"}, {"role": "user", "content": "what is the capital of france ?"}, {"role": "assistant", "content": "paris"}, {"role": "user", "content": "was the game fun ?"}, {"role": "assistant", "content": "good"}]}"#,
            "\n"
        ),
    );
    let cfg = DataConfig::default();
    let (ex, _) = load_examples(&p, TaskKind::CausalLm, &cfg, &tok, Some(&template), None).unwrap();
    assert_eq!(
        ex[0].input_ids,
        ids(
            "[CLS] b the game [SEP] [CLS] b what is the capital of france ? [SEP] \
             [CLS] a paris [SEP] [CLS] b was the game fun ? [SEP] [CLS] a good [SEP]"
        )
    );
    let trained = targets(&ex[0]);
    // The replies and their end-of-turn tokens; not the role headers.
    assert_eq!(trained, ids("paris [SEP] good [SEP]"));

    // Every token when assistant-only loss is off.
    let all = DataConfig {
        assistant_only_loss: false,
        ..DataConfig::default()
    };
    let (ex, _) = load_examples(&p, TaskKind::CausalLm, &all, &tok, Some(&template), None).unwrap();
    assert_eq!(ex[0].labels.as_ref().unwrap(), &ex[0].input_ids);

    // A long conversation is cut in its longest user message; every turn and the answer stay.
    let short = DataConfig {
        max_length: 20,
        ..DataConfig::default()
    };
    let (ex, _) =
        load_examples(&p, TaskKind::CausalLm, &short, &tok, Some(&template), None).unwrap();
    assert!(ex[0].input_ids.len() <= 20, "{:?}", ex[0].input_ids);
    assert_eq!(
        ex[0]
            .input_ids
            .iter()
            .filter(|&&t| t == id("[CLS]"))
            .count(),
        5
    );
    let trained = targets(&ex[0]);
    assert_eq!(trained, ids("paris [SEP] good [SEP]"));
}

#[test]
fn bad_conversations_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), Value::Null);
    let template = chat_template();
    let good = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    let cases = [
        (r#"{"messages": []}"#, "empty conversation"),
        (
            r#"{"messages": [{"content": "a"}]}"#,
            "message 0 has no `role`",
        ),
        (
            r#"{"messages": [{"role": "narrator", "content": "a"}]}"#,
            "unknown role `narrator`",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}]}"#,
            "no assistant turn",
        ),
        (r#"{"messages": [{"role": "user"}]}"#, "has no `content`"),
        (r#"{"messages": "a b"}"#, "must be an array"),
    ];
    for (row, needle) in cases {
        let p = write(dir.path(), "bad.jsonl", &format!("{good}\n{row}\n"));
        let msg = load_examples(
            &p,
            TaskKind::CausalLm,
            &DataConfig::default(),
            &tok,
            Some(&template),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("bad.jsonl:2: field `messages`"), "{msg}");
        assert!(msg.contains(needle), "{msg} lacks {needle}");
    }
    // Without a chat template: the line, and what to do.
    let p = write(dir.path(), "plain.jsonl", &format!("{good}\n"));
    let msg = load(&p, TaskKind::CausalLm, &tok, None)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("plain.jsonl:1: ") && msg.contains("chat template"),
        "{msg}"
    );
}

/// Best-fit decreasing: every token kept, no row over the limit (but an example longer than
/// it, alone), the first label of every later sequence ignored, the same rows every time; a
/// batch of packed rows carries their sequences for the forward.
#[test]
fn pack_fills_rows_best_fit_decreasing() {
    let lm = |ids: Vec<i64>, line: usize| Example {
        token_type_ids: vec![0; ids.len()],
        labels: Some(ids.clone()),
        input_ids: ids,
        label: None,
        line,
        segments: Vec::new(),
        image: None,
    };
    let examples: Vec<Example> = [5usize, 3, 12, 4, 1, 6, 2]
        .iter()
        .enumerate()
        .map(|(i, &n)| lm((0..n as i64).map(|k| 10 * i as i64 + k).collect(), i + 1))
        .collect();
    let rows = super::pack(&examples, 8);
    assert_eq!(rows, super::pack(&examples, 8), "deterministic");
    // 12 alone; 6+2; 5+3; 4+1.
    let sizes: Vec<Vec<usize>> = rows.iter().map(|r| r.segments.clone()).collect();
    assert_eq!(sizes, [vec![12], vec![6, 2], vec![5, 3], vec![4, 1]]);
    let total: usize = rows.iter().map(|r| r.input_ids.len()).sum();
    assert_eq!(total, 33);
    let row = &rows[1];
    assert_eq!(row.input_ids, [50, 51, 52, 53, 54, 55, 60, 61]);
    assert_eq!(
        row.labels.as_deref(),
        Some(&[50, 51, 52, 53, 54, 55, -100, 61][..])
    );
    assert_eq!((row.line, row.token_type_ids.len()), (6, 8));

    let device = Device::flex();
    let refs: Vec<&Example> = rows[1..].iter().collect();
    let c = collate(&refs, 0, &device);
    let packed = c.packed.expect("packed rows");
    assert_eq!(packed.lengths(0), [6, 2]);
    assert_eq!(packed.lengths(2), [4, 1]);
    assert_eq!(vec2(c.attention_mask).1[16..], [1, 1, 1, 1, 1, 0, 0, 0]);
    // Plain examples collate without packing.
    let plain: Vec<&Example> = examples.iter().collect();
    assert!(collate(&plain, 0, &device).packed.is_none());
}
