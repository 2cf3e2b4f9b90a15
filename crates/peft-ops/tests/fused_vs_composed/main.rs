//! Every fused op against the standard Burn composition (`peft_ops::reference`): values and
//! gradients within 1e-5 (relative above magnitude 1), on random inputs of the models' shapes
//! (all-MiniLM-L6-v2: batch 16 x 64, hidden 384, 12 heads x 32, intermediate 1536; a tiny
//! Llama with GQA), masks included.

mod attention;
mod common;
mod elementwise;
mod lora;
mod mixed_lora;
mod norm;
mod optim;

/// The comparisons above are only meaningful if the fused path runs: flex, with and without
/// autodiff, goes to the kernels.
#[test]
fn flex_takes_the_fused_path() {
    use burn::tensor::Device;
    assert!(peft_ops::fused_enabled());
    assert!(peft_ops::is_flex(&Device::flex()));
    assert!(peft_ops::is_flex(&Device::flex().autodiff()));
}
