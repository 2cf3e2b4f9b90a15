//! The Hugging Face checkpoint names of each architecture, one file per architecture, read in
//! both directions: loading ([`from_pretrained`](crate::from_pretrained), checkpoint key ->
//! module path, as burn-store key renames) and saving
//! ([`save_pretrained`](crate::save_pretrained), module path -> checkpoint key).
//!
//! Our modules keep Hugging Face's names wherever Rust allows, so PEFT `target_modules` lists
//! and adapter keys apply unchanged; what differs is listed here.

pub(crate) mod bert;
pub(crate) mod gpt2;
pub(crate) mod llama;

/// A `(regex, replacement)` rewrite of checkpoint keys into module paths (burn-store's
/// `KeyRemapper` patterns).
pub(crate) type KeyRename = (String, String);

fn rename(pattern: &str, replacement: &str) -> KeyRename {
    (pattern.to_string(), replacement.to_string())
}
