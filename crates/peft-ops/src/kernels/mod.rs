//! The CPU kernels, on raw `f32` buffers of flex tensors.

pub mod attention;
pub mod dropout;
pub mod elementwise;
pub mod few_rows;
pub mod lora;
pub mod math;
pub mod matmul;
pub mod mixed_lora;
pub mod norm;
pub mod optim;
pub mod par;
pub mod rope;
pub mod simd;
pub mod softmax;
pub mod tensor;
