//! Where a model's files are: a local folder, or a hub id resolved through the standard
//! Hugging Face cache shared with Python (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`). `HF_HUB_OFFLINE=1` resolves from the cache only.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// The Hugging Face hub cache folder, as `huggingface_hub` computes it.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether `HF_HUB_OFFLINE` asks for cache-only resolution (`1`, `true`, `yes`, `on`).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// Files a model folder needs, besides the weights.
const REQUIRED: &[&str] = &["config.json"];
/// Optional files fetched when present.
const OPTIONAL: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Resolve `source` (a folder, or a hub id like `sentence-transformers/all-MiniLM-L6-v2`) to a
/// folder holding `config.json` and the weights.
pub fn resolve(source: &str) -> Result<PathBuf> {
    let path = Path::new(source);
    if path.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(ModelError::NotFound {
                id: source.into(),
                reason: format!("{} has no config.json", path.display()),
            });
        }
        return Ok(path.to_path_buf());
    }
    if !looks_like_hub_id(source) {
        return Err(ModelError::NotFound {
            id: source.into(),
            reason: "not an existing folder, and not a hub id of the form `owner/name`".into(),
        });
    }
    let cache = hf_hub::Cache::new(cache_dir());
    let repo = cache.model(source.to_string());
    if let Some(config) = repo.get("config.json")
        && weights_present(&repo)
    {
        return Ok(config.parent().expect("a file has a folder").to_path_buf());
    }
    if offline() {
        return Err(ModelError::NotFound {
            id: source.into(),
            reason: format!(
                "HF_HUB_OFFLINE is set and the model is not complete in the cache {}; download it once online, pass a local folder, or unset HF_HUB_OFFLINE",
                cache_dir().display()
            ),
        });
    }
    download(source)
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    (1..=2).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

fn weights_present(repo: &hf_hub::CacheRepo) -> bool {
    if repo.get("model.safetensors").is_some() {
        return true;
    }
    let Some(index) = repo.get("model.safetensors.index.json") else {
        return false;
    };
    match shard_names(&index) {
        Ok(shards) => shards.iter().all(|s| repo.get(s).is_some()),
        Err(_) => false,
    }
}

/// The shard file names listed by a `model.safetensors.index.json`.
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        file: index.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ModelError::InvalidConfig {
            file: index.to_path_buf(),
            reason: format!("not valid JSON: {e}"),
        })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::InvalidConfig {
            file: index.to_path_buf(),
            reason: "missing `weight_map`".into(),
        })?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

fn download(id: &str) -> Result<PathBuf> {
    let not_found = |e: hf_hub::api::sync::ApiError| ModelError::NotFound {
        id: id.into(),
        reason: format!("download from the Hugging Face hub failed: {e}"),
    };
    let api = hf_hub::api::sync::ApiBuilder::new()
        .with_cache_dir(cache_dir())
        .with_progress(true)
        .build()
        .map_err(not_found)?;
    let repo = api.model(id.to_string());
    let mut dir = None;
    for file in REQUIRED {
        let p = repo.get(file).map_err(not_found)?;
        dir = p.parent().map(Path::to_path_buf);
    }
    match repo.get("model.safetensors") {
        Ok(_) => {}
        Err(_) => {
            let index = repo
                .get("model.safetensors.index.json")
                .map_err(not_found)?;
            for shard in shard_names(&index)? {
                repo.get(&shard).map_err(not_found)?;
            }
        }
    }
    for file in OPTIONAL {
        let _ = repo.get(file);
    }
    dir.ok_or_else(|| ModelError::NotFound {
        id: id.into(),
        reason: "the hub returned no files".into(),
    })
}
