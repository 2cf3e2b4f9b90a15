//! Block-quantized frozen weight matrices and fused dequantize-and-multiply kernels: the base
//! weights of QLoRA (bitsandbytes NF4) and of GGUF models (llama.cpp's F16, BF16, Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0 and K-quants Q2_K ... Q6_K).
//!
//! - [`QuantFormat`]: the formats, their GGML type ids and block geometry.
//! - [`QuantBytes`]: shared bytes (a slice of a file buffer) without copying.
//! - [`QuantMatrix`]: `rows x cols` in a format, checked on construction (typed
//!   [`QuantError`]s, never a panic, nothing allocated before the sizes are known to fit);
//!   dequantization bit for bit as gguf-py / bitsandbytes; quantization for the formats gguf-py
//!   quantizes (and NF4).
//! - [`quant_matmul`]: `x · Wᵀ` differentiable in `x`; [`quant_rows`]: an embedding lookup.
//!   On flex (f32) both products are one fused op each (forward and input gradient), never a
//!   dense copy of the matrix; elsewhere (and with `PEFT_OPS_FUSED=0`) the composition of
//!   [`crate::reference::quant_matmul`].
//!
//! ```
//! use std::sync::Arc;
//! use burn::tensor::{Device, Tensor};
//! use peft_ops::quant::{QuantFormat, QuantMatrix, quant_matmul};
//!
//! // A [3, 64] weight (3 output features, 64 inputs), stored as Q8_0.
//! let values: Vec<f32> = (0..3 * 64).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
//! let w = Arc::new(QuantMatrix::quantize(QuantFormat::Q8_0, &values, 3, 64).unwrap());
//!
//! let device = Device::flex().autodiff();
//! let x = Tensor::<2>::ones([2, 64], &device).require_grad();
//! let y = quant_matmul(x.clone(), &w); // [2, 3]
//! assert_eq!(y.dims(), [2, 3]);
//! let grads = y.sum().backward();
//! assert_eq!(x.grad(&grads).unwrap().dims(), [2, 64]); // dx = dy · W; W gets no gradient
//! ```

mod bytes;
pub(crate) mod dequant;
mod format;
pub(crate) mod kernel;
mod matrix;
pub mod nf4;
mod ops;
mod quantize;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use bytes::QuantBytes;
pub use dequant::f16_to_f32;
pub use format::{NF4_BLOCK, QK_K, QuantFormat};
pub use matrix::QuantMatrix;
pub(crate) use ops::flex_product;
pub use ops::{quant_matmul, quant_matmul_t, quant_rows, quant_swiglu, try_quant_rows};
pub use quantize::to_bf16;

/// What went wrong building or using a [`QuantMatrix`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    /// A GGML type id this crate does not know or does not support.
    #[error(
        "GGML type id {0} is unknown or not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"
    )]
    UnknownGgmlType(u32),
    /// A format name that is not one of [`QuantFormat::name`]'s.
    #[error("unknown quantization format {0:?}")]
    UnknownFormatName(String),
    /// The row length is not a whole number of blocks.
    #[error("{format}: a row of {cols} values is not a whole number of {block_size}-value blocks")]
    ColsNotMultiple {
        /// The format.
        format: QuantFormat,
        /// Values per row.
        cols: usize,
        /// The format's block size.
        block_size: usize,
    },
    /// A size (bytes or values) overflows.
    #[error("{format}: a [{rows}, {cols}] matrix is too large (its size overflows)")]
    TooLarge {
        /// The format.
        format: QuantFormat,
        /// Rows.
        rows: usize,
        /// Values per row.
        cols: usize,
    },
    /// The bytes given are not exactly the matrix's size.
    #[error("{format}: a [{rows}, {cols}] matrix takes {expected} bytes, got {actual}")]
    DataLength {
        /// The format.
        format: QuantFormat,
        /// Rows.
        rows: usize,
        /// Values per row.
        cols: usize,
        /// `rows · row_bytes(cols)`.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// A byte range outside its buffer.
    #[error("byte range {start}..{end} is outside a buffer of {len} bytes")]
    RangeOutOfBounds {
        /// Range start.
        start: usize,
        /// Range end.
        end: usize,
        /// The buffer's length.
        len: usize,
    },
    /// A row index past the last row.
    #[error("row {row} is out of range for a matrix of {rows} rows")]
    RowOutOfRange {
        /// The index.
        row: usize,
        /// Rows of the matrix.
        rows: usize,
    },
    /// A row id (a token id of an embedding lookup) that is negative or past the last row.
    #[error("row id {id} is out of range for a matrix of {rows} rows")]
    InvalidRowId {
        /// The id.
        id: i64,
        /// Rows of the matrix.
        rows: usize,
    },
    /// The values to quantize are not `rows · cols` of them.
    #[error("expected {expected} values to quantize, got {actual}")]
    ValuesLength {
        /// `rows · cols`.
        expected: usize,
        /// Values given.
        actual: usize,
    },
    /// Quantization to this format is not implemented (the K-quants).
    #[error("quantizing to {0} is not supported (only dequantization: quantize with llama.cpp)")]
    CannotQuantize(QuantFormat),
    /// A NaN or infinite value to quantize to a block format.
    #[error("{format}: cannot quantize the non-finite value at index {index}")]
    NonFinite {
        /// The format.
        format: QuantFormat,
        /// Index of the first non-finite value.
        index: usize,
    },
}

impl QuantFormat {
    /// [`QuantFormat::from_ggml_type`] as a typed error.
    pub fn try_from_ggml_type(id: u32) -> Result<Self, QuantError> {
        Self::from_ggml_type(id).ok_or(QuantError::UnknownGgmlType(id))
    }
}
