//! The typed errors of [`super::LoraFile::read`].

use std::path::PathBuf;

use super::LoraFormat;

/// Everything that can make a LoRA file unreadable; every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KohyaError {
    /// Opening or reading the file failed.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Not a well-formed safetensors file (truncated, bad header, offsets past the end, ...).
    #[error("{}: corrupt or truncated safetensors file: {reason}", file.display())]
    Corrupt {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A key that is not part of a plain LoRA module in any format this module reads (LoHa /
    /// LoKr tensors, embeddings, keys of another model family, ...).
    #[error("{}: `{key}` is not a LoRA tensor of a kohya or diffusers SD LoRA file ({reason})", file.display())]
    UnknownKey {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// Why it was not recognized.
        reason: String,
    },
    /// The file holds no LoRA tensors at all.
    #[error("{}: no LoRA tensors (expected kohya `lora_unet_*.lora_down.weight` or diffusers `unet.*.lora_A.weight` / `.lora.down.weight` keys)", file.display())]
    Empty {
        /// The file.
        file: PathBuf,
    },
    /// Keys of two formats in one file.
    #[error("{}: mixes {first} keys and {second} keys (`{key}`)", file.display())]
    MixedFormats {
        /// The file.
        file: PathBuf,
        /// The format of the first LoRA key.
        first: LoraFormat,
        /// The other format.
        second: LoraFormat,
        /// A key of the other format.
        key: String,
    },
    /// A module has one half of its down / up pair but not the other.
    #[error("{}: module `{module}` has `{present}` but no `{missing}`", file.display())]
    MissingHalf {
        /// The file.
        file: PathBuf,
        /// The module name, as in the file.
        module: String,
        /// The key that is there.
        present: String,
        /// The key that is missing.
        missing: String,
    },
    /// Down and up projections disagree on the rank.
    #[error("{}: module `{module}`: down projection has rank {down} (shape {down_shape:?}), up projection has rank {up} (shape {up_shape:?})", file.display())]
    RankMismatch {
        /// The file.
        file: PathBuf,
        /// The module name, as in the file.
        module: String,
        /// Rank of the down projection (its first axis).
        down: usize,
        /// Rank of the up projection (its second axis).
        up: usize,
        /// Shape of the down projection.
        down_shape: Vec<usize>,
        /// Shape of the up projection.
        up_shape: Vec<usize>,
    },
    /// A tensor's shape fits no linear or convolutional LoRA layer.
    #[error("{}: tensor `{key}` has shape {shape:?}: {reason}", file.display())]
    BadShape {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// Its shape.
        shape: Vec<usize>,
        /// What was expected.
        reason: String,
    },
    /// An `alpha` that is not one float value.
    #[error("{}: `{key}` must be one F16 / BF16 / F32 / F64 value, found dtype {dtype} shape {shape:?}", file.display())]
    BadAlpha {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// Its dtype.
        dtype: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// An `alpha` that is NaN or infinite: every output of the module would be too.
    #[error("{}: `{key}` is {value}, not a finite number", file.display())]
    NonFiniteAlpha {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// The value read.
        value: f64,
    },
}
