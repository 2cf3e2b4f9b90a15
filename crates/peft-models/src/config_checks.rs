//! The checks every family runs on its `config.json` when it is read: sizes that would divide
//! by zero or build empty layers, head counts that do not divide, activations we do not
//! implement, and options we parse but that would change the math if we ignored them. Every
//! failure names the file, the key, what was found and what is expected.

use std::path::Path;

use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::ops::Activation;

pub(crate) fn invalid(
    file: &Path,
    key: &str,
    found: impl std::fmt::Display,
    expected: &str,
) -> ModelError {
    ModelError::InvalidConfig {
        file: file.to_path_buf(),
        reason: format!("`{key}` = {found}: {expected}"),
    }
}

pub(crate) fn unsupported(
    file: &Path,
    key: &str,
    found: impl std::fmt::Display,
    reason: &str,
) -> ModelError {
    ModelError::UnsupportedOption {
        file: file.to_path_buf(),
        key: key.into(),
        found: found.to_string(),
        reason: reason.into(),
    }
}

pub(crate) fn positive(file: &Path, key: &str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(invalid(file, key, 0, "must be at least 1"));
    }
    Ok(())
}

pub(crate) fn divides(
    file: &Path,
    (key, value): (&str, usize),
    (by, by_value): (&str, usize),
) -> Result<()> {
    if !value.is_multiple_of(by_value) {
        return Err(invalid(
            file,
            key,
            value,
            &format!("must be a multiple of `{by}` ({by_value})"),
        ));
    }
    Ok(())
}

pub(crate) fn epsilon(file: &Path, key: &str, value: f64) -> Result<()> {
    // Burn's LayerNorm / RmsNorm refuse (panic on) an epsilon that is not positive.
    if !value.is_finite() || value <= 0.0 {
        return Err(invalid(
            file,
            key,
            value,
            "must be a finite number > 0 (e.g. 1e-5)",
        ));
    }
    Ok(())
}

pub(crate) fn activation(file: &Path, key: &str, name: &str) -> Result<Activation> {
    Activation::from_hf(name).ok_or_else(|| {
        unsupported(
            file,
            key,
            format!("\"{name}\""),
            &format!("implemented: {}", Activation::NAMES.join(", ")),
        )
    })
}

pub(crate) fn flag(raw: &Value, key: &str) -> bool {
    raw.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// A positive, finite float (a RoPE base, a scaling factor): [`ModelError::InvalidConfig`]
/// otherwise.
pub(crate) fn positive_float(file: &Path, key: &str, value: f64) -> Result<()> {
    if !value.is_finite() || value <= 0.0 {
        return Err(invalid(file, key, value, "must be a finite number > 0"));
    }
    Ok(())
}
