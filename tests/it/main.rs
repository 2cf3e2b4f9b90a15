//! Integration tests that share one test binary: each `tests/*.rs` file links all of Burn
//! into a binary of its own, so files that can share a process are modules here (one module
//! per former file; helpers in `tests/common`, shared with the other binaries).
//!
//! The files left as binaries of their own change process-wide state while they run: the
//! environment (`hub_offline`, `minilm`, `truncation`), the fused-kernel switch
//! (`fused_models`), or Burn's global RNG seed that their tests reproduce draws from
//! (`crash_safety`, `dora_parity`, `freezing`, `ia3_parity`, `layouts`, `mixed_batches`,
//! `plugin_boundary`, `prefix_parity`); sharing a process would make them race the others.
//!
//! Run one group with a filter: `cargo test --test it lora_parity::`.

#[path = "../common/mod.rs"]
mod common;

mod all_linear_e2e;
mod architectures;
mod auto_peft;
mod bad_input;
mod chat_templates;
mod chunked_loss;
mod combine_parity;
mod config_variants;
mod fuzz_parsers;
mod gemma3;
mod gguf_export;
mod gguf_models;
mod gguf_tokenizer;
mod lora_parity;
mod matching_reference;
mod mobilenet_v2;
mod models_parity;
mod packing;
mod phi3;
mod plain_burn_modules;
mod qwen3;
mod resnet;
mod vit;
