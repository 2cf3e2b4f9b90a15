//! Adapter-aware layers: drop-in replacements for Burn's layers that hold named adapters.

mod copy;
mod embedding;
mod linear;

pub use copy::ModuleCopy;
pub use embedding::{Embedding, EmbeddingConfig};
pub use linear::{Linear, LinearConfig, WeightLayout};
