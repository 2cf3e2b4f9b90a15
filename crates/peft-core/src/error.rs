//! Typed errors of the PEFT core.

use std::path::PathBuf;

impl From<crate::atomic::IoAt> for PeftError {
    fn from(e: crate::atomic::IoAt) -> Self {
        PeftError::Io {
            file: e.path,
            source: e.source,
        }
    }
}

/// Result alias used across burn-peft.
pub type Result<T, E = PeftError> = std::result::Result<T, E>;

/// Everything that can go wrong while injecting, loading, saving or merging adapters.
///
/// Every variant that comes from a file names the file and the key, and says what was expected
/// and what was found, so a user can fix the input without reading our source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeftError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file or folder involved.
        file: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but cannot be parsed (truncated, not JSON, not safetensors, ...).
    #[error("{}: corrupt or truncated file: {reason}", file.display())]
    CorruptFile {
        /// The offending file.
        file: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The bundle lacks a tensor the adapter config implies.
    #[error("{}: missing tensor `{key}` (the adapter config targets this module; re-export the adapter or fix target_modules)", file.display())]
    MissingTensor {
        /// The safetensors file.
        file: PathBuf,
        /// Full key that was expected.
        key: String,
    },
    /// The bundle holds a tensor no injected adapter consumes.
    #[error("{}: unexpected tensor `{key}`: no module of this model / adapter config uses it (was the adapter trained on another model or with other target_modules?)", file.display())]
    UnexpectedTensor {
        /// The safetensors file.
        file: PathBuf,
        /// The key nobody consumed.
        key: String,
    },
    /// A tensor has the wrong shape for the module it targets.
    #[error("{}: tensor `{key}` has shape {found:?}, expected {expected:?}", file.display())]
    ShapeMismatch {
        /// The safetensors file.
        file: PathBuf,
        /// The tensor key.
        key: String,
        /// Shape required by the model and config.
        expected: Vec<usize>,
        /// Shape found in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype we cannot read.
    #[error("{}: tensor `{key}` has dtype {found}, expected F32, F16 or BF16", file.display())]
    UnsupportedDtype {
        /// The safetensors file.
        file: PathBuf,
        /// The tensor key.
        key: String,
        /// The dtype in the file.
        found: String,
    },
    /// `peft_type` names no method linked into this program.
    #[error("{}: unknown peft_type `{found}`; registered methods: {}", file.as_ref().map(|f| f.display().to_string()).unwrap_or_else(|| "<config>".into()), registered.join(", "))]
    UnknownPeftType {
        /// The config file, when there is one.
        file: Option<PathBuf>,
        /// The value found.
        found: String,
        /// Names that would have worked.
        registered: Vec<String>,
    },
    /// A config key holds an invalid value (wrong type, out of range, bad regex, ...).
    #[error("{}key `{key}`: {reason}", file_prefix(file))]
    InvalidConfig {
        /// The config file, when there is one.
        file: Option<PathBuf>,
        /// The key (dotted for nested keys).
        key: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A config option changes the math in a way this implementation does not support.
    #[error(
        "{}key `{key}` = {found} is not supported by burn-peft ({reason}); loading it would silently compute something else",
        file_prefix(file)
    )]
    Unsupported {
        /// The config file, when there is one.
        file: Option<PathBuf>,
        /// The key.
        key: String,
        /// The value found.
        found: String,
        /// Why, and what would be needed.
        reason: String,
    },
    /// An entry of `target_modules` (or `modules_to_save`) matches no site of the model.
    #[error("`{field}` entry `{entry}` matches no {kind} of the model; {}the model's names: {}", if closest.is_empty() { String::new() } else { format!("closest names: {}; ", closest.join(", ")) }, names.join(", "))]
    TargetNotFound {
        /// `target_modules`, `modules_to_save`, ...
        field: String,
        /// The entry that matched nothing.
        entry: String,
        /// What kind of module was searched.
        kind: String,
        /// The most similar module names of the model.
        closest: Vec<String>,
        /// The distinct last names of the model's modules of that kind (`query`, `value`,
        /// `dense`, ...), what an entry may name.
        names: Vec<String>,
    },
    /// A target matched a module the method cannot adapt.
    #[error("module `{path}` is a {kind}, which {method} cannot adapt")]
    UnsupportedSite {
        /// The module path.
        path: String,
        /// Its kind.
        kind: String,
        /// The method name.
        method: String,
    },
    /// An adapter of this name already exists.
    #[error("an adapter named `{0}` already exists; delete it first or pick another name")]
    AdapterExists(String),
    /// No adapter of this name.
    #[error("no adapter named `{name}`; adapters: {}", if available.is_empty() { "(none)".to_string() } else { available.join(", ") })]
    AdapterNotFound {
        /// The name asked for.
        name: String,
        /// The names that exist.
        available: Vec<String>,
    },
    /// The operation needs something the method cannot do (merge a prefix, ...).
    #[error("adapter `{adapter}` ({method}): {reason}")]
    NotSupportedByMethod {
        /// The adapter name.
        adapter: String,
        /// The method name.
        method: String,
        /// What cannot be done.
        reason: String,
    },
    /// Adapters cannot be combined as asked ([`PeftModel::add_weighted_adapter`](crate::PeftModel::add_weighted_adapter)).
    #[error("cannot combine adapters {}: `{field}`: {reason}", adapters.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>().join(", "))]
    IncompatibleAdapters {
        /// The adapters at fault.
        adapters: Vec<String>,
        /// The config field or option that disagrees (`r`, `target_modules`, `peft_type`, ...).
        field: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// An operation is not valid in the current state (for example unmerge with nothing merged).
    #[error("{0}")]
    InvalidState(String),
}

fn file_prefix(file: &Option<PathBuf>) -> String {
    match file {
        Some(f) => format!("{}: ", f.display()),
        None => String::new(),
    }
}

impl PeftError {
    /// Attach the config file to errors that came from a config value without one.
    pub fn in_file(mut self, path: &std::path::Path) -> Self {
        match &mut self {
            PeftError::InvalidConfig { file, .. }
            | PeftError::Unsupported { file, .. }
            | PeftError::UnknownPeftType { file, .. }
                if file.is_none() =>
            {
                *file = Some(path.to_path_buf());
            }
            _ => {}
        }
        self
    }

    /// Shorthand for an [`PeftError::InvalidConfig`] without a file.
    pub fn invalid_config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        PeftError::InvalidConfig {
            file: None,
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for an [`PeftError::Unsupported`] without a file.
    pub fn unsupported(
        key: impl Into<String>,
        found: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        PeftError::Unsupported {
            file: None,
            key: key.into(),
            found: found.into(),
            reason: reason.into(),
        }
    }
}
