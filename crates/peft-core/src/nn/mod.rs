//! Adapter-aware layers: drop-in replacements for Burn's layers that hold named adapters.

mod conv;
mod conv1d;
mod copy;
mod embedding;
mod guard;
mod linear;
mod mixed;
mod packed;
mod prefix;
mod quantized;
mod rows;

pub(crate) use conv::KernelSlot;
pub use conv::{Conv2d, Conv2dConfig, ConvBase, ConvGeometry, kernel_as_matrix, matrix_as_kernel};
pub use conv1d::{Conv1d, Conv1dConfig};
pub use copy::ModuleCopy;
pub use embedding::{Embedding, EmbeddingConfig};
pub use linear::{Linear, LinearConfig, WeightLayout};
pub use packed::PackedRows;
pub use prefix::{KvPrefix, PrefixKv, RowPrefix};
pub use quantized::{QuantizedBase, QuantizedWeight, dequantize_sites, quantized_sites};
pub use rows::{BASE_ROW, ForwardContext, IdBounds, RowAdapters, RowGroup};
