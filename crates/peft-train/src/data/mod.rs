//! Training data: JSONL and CSV files of examples, tokenized once, label maps, seeded epoch
//! order and dynamic-padding collation.
//!
//! Two tasks read different fields of a row (names set in [`DataConfig`]):
//!
//! - [`TaskKind::Classification`]: `text`, an optional `text_pair` and a `label` (a JSON string
//!   or non-negative integer; in CSV every cell is a string).
//! - [`TaskKind::CausalLm`]: `text` (loss on every token), `prompt` + `completion` (loss on
//!   the completion only), or `messages`, a conversation in the OpenAI / TRL format rendered
//!   with the model's chat template (loss on the assistant's turns only, [`chat`]).
//!
//! Image classification reads an image folder or a pixel CSV instead ([`load_image_examples`],
//! preprocessed as the model's `preprocessor_config.json` says: [`ImagePreprocess`]).
//!
//! Errors name the file and the line (`train.jsonl:3: …`).
//!
//! The module is split by job: [`config`](DataConfig) (what to read), `labels` ([`LabelMap`]),
//! `read` (JSONL/CSV rows and [`load_examples`]), `encode` (rows to token ids), `order`
//! ([`epoch_order`]), `pack` ([`pack`]: several short examples per row) and `collate`
//! ([`collate`]).

use std::path::PathBuf;

pub mod chat;
mod collate;
mod config;
mod encode;
mod images;
mod labels;
mod order;
mod pack;
mod read;

pub use collate::{Collated, collate};
pub use config::{DataConfig, TaskKind};
pub use encode::Example;
pub use images::{Image, ImagePreprocess, load_image_examples};
pub use labels::LabelMap;
pub use order::epoch_order;
pub use pack::pack;
pub use read::load_examples;

/// The file name under which a run stores its [`LabelMap`].
pub const LABEL_MAP_FILE: &str = "label_map.json";

/// The file name under which a run stores the [`DataConfig`] it read its data with, beside
/// each adapter it saves, so evaluation reads data as training did (`max_length`, fields).
pub const DATA_CONFIG_FILE: &str = "data_config.json";

/// The label id of tokens that take no loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Errors while reading a data set. Every variant names the file; row errors name the line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The file could not be read or written.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A row is not valid: bad JSON or CSV, a missing field, a value of the wrong type, an
    /// empty text.
    #[error("{}:{line}: {reason}", file.display())]
    Malformed {
        /// The file.
        file: PathBuf,
        /// The line (1-based) where the row starts.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A row's label is not in the label map given (the one of the training set).
    #[error("{}:{line}: unknown label `{label}`; known labels: {}", file.display(), known.join(", "))]
    UnknownLabel {
        /// The file.
        file: PathBuf,
        /// The line (1-based).
        line: usize,
        /// The label found.
        label: String,
        /// The labels of the map, in id order.
        known: Vec<String>,
    },
    /// The tokenizer failed on a row.
    #[error("{}:{line}: tokenizer error: {reason}", file.display())]
    Tokenizer {
        /// The data file.
        file: PathBuf,
        /// The line (1-based).
        line: usize,
        /// The cause.
        reason: String,
    },
    /// An image file or pixel file that cannot be used: not a readable PNG / JPEG, a channel
    /// count the model cannot take, an image folder without class subfolders.
    #[error("{}: {reason}", file.display())]
    BadImage {
        /// The file (or folder).
        file: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The file holds no examples.
    #[error("{}: the file holds no examples", file.display())]
    Empty {
        /// The file.
        file: PathBuf,
    },
    /// The data format is neither JSONL nor CSV.
    #[error(
        "{}: unsupported data format `{format}`; use a .jsonl (JSON Lines) or .csv file, or set `data.format` (`--format` on the command line) to \"jsonl\" or \"csv\" (a TSV file converts to CSV)",
        file.display()
    )]
    UnsupportedFormat {
        /// The file.
        file: PathBuf,
        /// The format asked for, or the file's extension.
        format: String,
    },
}

#[cfg(test)]
mod tests;
