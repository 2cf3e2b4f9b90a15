//! `burn-peft inspect` on the committed fixture bundles of every shipped method. `inspect` knows
//! no method: the config lines and tensor roles come from `PeftMethod::describe`. The LoRA and
//! prefix outputs are the ones `inspect` printed before it lost its method-specific code
//! (recorded from that build), plus the `roles:` section.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(rest: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rest)
}

/// What `inspect` prints for `bundle`, without the first line (which echoes the path).
fn inspect(bundle: &str, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_burn-peft"))
        .arg("inspect")
        .arg(fixture(bundle))
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = stdout.lines().next().unwrap();
    assert!(first.starts_with("adapter: "), "{first}");
    stdout.lines().skip(1).map(|l| format!("{l}\n")).collect()
}

#[test]
fn lora_bundle_output_is_unchanged() {
    let expected = "\
method:          LORA
task_type:       SEQ_CLS
r:               4
lora_alpha:      8
lora_dropout:    0.0
use_rslora:      false
target_modules:  [\"query\",\"value\"]
rank_pattern:    {}
alpha_pattern:   {}
bias:            none
modules_to_save: [\"classifier\",\"classifier\",\"score\"]
tensors:         10 (1,123 parameters, 5.6 KiB on disk, dtype F32)
ranks:           r=4 on 4 module(s)
modules:
  classifier       2 tensor(s)           99 params
  query            4 tensor(s)          512 params
  value            4 tensor(s)          512 params
roles:
  (other)          2 tensor(s)  modules_to_save copies, trained biases, saved base tables
  lora_A.weight    4 tensor(s)  LoRA down-projection A [r, in]
  lora_B.weight    4 tensor(s)  LoRA up-projection B [out, r]
";
    assert_eq!(inspect("models/bert_cls/lora", &[]), expected);
}

#[test]
fn lora_with_patterns_and_embedding_output_is_unchanged() {
    let printed = inspect("lora_tiny/main", &[]);
    for line in [
        "use_rslora:      true\n",
        "rank_pattern:    {\"layers.1.attn.v_proj\":2}\n",
        "alpha_pattern:   {\"down_proj\":16}\n",
        "ranks:           r=2 on 1 module(s), r=4 on 6 module(s)\n",
        "  embed_tokens        2 tensor(s)          264 params\n",
        "  v_proj              4 tensor(s)          192 params\n",
        "  lora_embedding_A    1 tensor(s)  embedding LoRA A [r, vocab]\n",
    ] {
        assert!(printed.contains(line), "missing {line:?} in\n{printed}");
    }
}

#[test]
fn prefix_bundle_output_is_unchanged() {
    let expected = "\
method:              PREFIX_TUNING
task_type:           SEQ_CLS
modules_to_save:     [\"classifier\",\"score\",\"classifier\",\"score\"]
num_virtual_tokens:  3
prefix_projection:   false
encoder_hidden_size: 32
num_layers:          2
token_dim:           32
num_attention_heads: 4
tensors:             3 (483 parameters, 2.2 KiB on disk, dtype F32)
modules:
  classifier           2 tensor(s)           99 params
  prompt_embeddings    1 tensor(s)          384 params
roles:
  (other)              2 tensor(s)  modules_to_save copies, trained biases, saved base tables
  prompt_embeddings    1 tensor(s)  prefix keys/values [num_virtual_tokens, num_layers·2·token_dim]
";
    assert_eq!(inspect("prefix/bert_cls_table", &[]), expected);
}

#[test]
fn dora_and_ia3_bundles_are_described_by_their_methods() {
    let dora = inspect("dora/gpt2", &[]);
    for line in [
        "use_dora:       true\n",
        "ranks:          r=4 on 4 module(s)\n",
        "  c_attn                   6 tensor(s)        1,216 params\n",
        "  lora_magnitude_vector    4 tensor(s)  DoRA magnitude m [out] (column norms of W + s·B·A at init)\n",
    ] {
        assert!(dora.contains(line), "missing {line:?} in\n{dora}");
    }
    let model = fixture("models/bert_cls");
    let ia3 = inspect("ia3/bert_cls", &["--model", model.to_str().unwrap()]);
    for line in [
        "method:              IA3\n",
        "feedforward_modules: [\"output.dense\"]\n",
        "  dense         4 tensor(s)          192 params\n",
        "  ia3_l         8 tensor(s)  IA3 scale l: [out, 1] scales outputs, [1, in] scales inputs (feedforward)\n",
        "every tensor of the bundle fits its module\n",
        "trainable params: 419 || all params: 24,934 || trainable%: 1.6804\n",
    ] {
        assert!(ia3.contains(line), "missing {line:?} in\n{ia3}");
    }
}
