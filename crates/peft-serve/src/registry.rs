//! Which adapters the server holds, as the HTTP side sees them: names for `/v1/models` and for
//! checking a request's `model`, and where a load may read from. The model itself belongs to
//! the scheduler thread, which updates this registry when it loads or unloads.

use std::path::{Component, Path, PathBuf};
use std::sync::RwLock;

use crate::error::ApiError;

/// One adapter of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterInfo {
    /// Its name (a request's `model`).
    pub name: String,
    /// The folder it was loaded from.
    pub path: PathBuf,
    /// The folder as clients see it: relative to `--adapters-dir`, else its last component
    /// (the server's own paths are not the clients' business).
    pub shown_path: String,
    /// Its `peft_type`.
    pub peft_type: String,
    /// Virtual tokens it puts in front of every sequence (prefix tuning), else 0.
    pub prefix_len: usize,
    /// Unix seconds when it was loaded.
    pub loaded_at: u64,
    /// Being unloaded: new requests are refused, running ones finish.
    pub draining: bool,
}

/// The adapters loaded, and the one folder runtime loads may read from.
#[derive(Debug, Default)]
pub struct Registry {
    adapters_dir: Option<PathBuf>,
    adapters: RwLock<Vec<AdapterInfo>>,
}

/// Longest adapter name accepted.
const MAX_NAME: usize = 128;

/// The characters an adapter name may hold. The core refuses `.`, `/` and backslashes in a name (it
/// becomes a key segment and a folder name in PEFT's format); this set is inside that rule, so
/// a name the server accepts is one the core accepts, and a bad name is refused here, naming
/// `name`, before anything else is looked at.
fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
}

impl Registry {
    /// A registry whose runtime loads read only from under `adapters_dir` (none: runtime
    /// loading is off). The folder is canonicalized here, so later checks compare real paths.
    pub fn new(adapters_dir: Option<&Path>) -> std::io::Result<Self> {
        let adapters_dir = adapters_dir.map(std::fs::canonicalize).transpose()?;
        Ok(Self {
            adapters_dir,
            adapters: RwLock::default(),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<AdapterInfo>> {
        // A panic while holding the lock cannot leave the list half-written (every write is
        // one push, retain or field store), so a poisoned lock is still usable.
        self.adapters.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<AdapterInfo>> {
        self.adapters.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Every adapter, in load order (draining ones included).
    pub fn list(&self) -> Vec<AdapterInfo> {
        self.read().clone()
    }

    /// Names of the adapters requests may use (not draining).
    pub fn serving_names(&self) -> Vec<String> {
        self.read()
            .iter()
            .filter(|a| !a.draining)
            .map(|a| a.name.clone())
            .collect()
    }

    /// The adapter a request's `model` names, if it serves requests; `base` is `Ok(None)`;
    /// 404 listing the loaded adapters otherwise.
    pub fn resolve_model(&self, model: &str) -> Result<Option<AdapterInfo>, ApiError> {
        if model == crate::BASE_MODEL {
            return Ok(None);
        }
        let adapters = self.read();
        match adapters.iter().find(|a| a.name == model && !a.draining) {
            Some(a) => Ok(Some(a.clone())),
            None => {
                drop(adapters);
                Err(ApiError::unknown_adapter(model, &self.serving_names()))
            }
        }
    }

    /// Whether `name` is taken (draining adapters included).
    pub fn contains(&self, name: &str) -> bool {
        self.read().iter().any(|a| a.name == name)
    }

    pub(crate) fn insert(&self, info: AdapterInfo) {
        self.write().push(info);
    }

    pub(crate) fn set_draining(&self, name: &str, draining: bool) {
        for a in self.write().iter_mut().filter(|a| a.name == name) {
            a.draining = draining;
        }
    }

    pub(crate) fn remove(&self, name: &str) {
        self.write().retain(|a| a.name != name);
    }

    /// Adapters loaded (draining ones included: they still hold memory).
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no adapter is loaded.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// `dir` as clients may see it: relative to `--adapters-dir` when it lies under it, else
    /// only its last component.
    pub fn shown_path(&self, dir: &Path) -> String {
        if let Some(root) = &self.adapters_dir
            && let Ok(relative) = dir.strip_prefix(root)
        {
            return relative.display().to_string();
        }
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// `message` with the server's adapters folder taken out of every path in it, so an
    /// error about a bundle names its files relative to `--adapters-dir`.
    pub fn scrub(&self, message: &str) -> String {
        match &self.adapters_dir {
            Some(root) => {
                let root = root.display().to_string();
                message
                    .replace(&format!("{root}{}", std::path::MAIN_SEPARATOR), "")
                    .replace(&root, ".")
            }
            None => message.to_string(),
        }
    }

    /// Check a name for a new adapter: 400 naming `name` unless it is 1..=128 of
    /// `[A-Za-z0-9_-]`, not `base` or `__base__`.
    pub fn check_name(name: &str) -> Result<(), ApiError> {
        if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(name_char) {
            return Err(ApiError::bad_field(
                "name",
                format!("an adapter name is 1 to {MAX_NAME} of A-Z a-z 0-9 _ -, found `{name}`"),
            ));
        }
        if name == crate::BASE_MODEL || name == peft_core::nn::BASE_ROW {
            return Err(ApiError::bad_field(
                "name",
                format!("`{name}` names the base model; choose another adapter name"),
            ));
        }
        Ok(())
    }

    /// The folder a runtime load of `requested` reads: a relative path under `--adapters-dir`
    /// without `..`, that really lies under it once symbolic links are resolved. 403 when the
    /// server has no `--adapters-dir`; 400 for an absolute path or `..`; 404 if it does not
    /// exist.
    pub fn resolve_path(&self, requested: &str) -> Result<PathBuf, ApiError> {
        let Some(root) = &self.adapters_dir else {
            return Err(ApiError::forbidden(
                "this server loads adapters only at start: run it with --adapters-dir DIR to \
                 allow POST /v1/adapters",
            ));
        };
        let path = Path::new(requested);
        let escapes = path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir));
        if requested.is_empty() || escapes {
            return Err(ApiError::bad_field(
                "path",
                format!(
                    "`{requested}`: give a folder relative to the server's adapters folder, \
                     without `..` or a leading `/`"
                ),
            ));
        }
        let joined = root.join(path);
        let real = std::fs::canonicalize(&joined).map_err(|_| {
            ApiError::not_found(format!(
                "no adapter folder `{requested}` under the server's adapters folder"
            ))
        })?;
        if !real.starts_with(root) {
            return Err(ApiError::forbidden(format!(
                "`{requested}` leads outside the server's adapters folder"
            )));
        }
        if !real.is_dir() {
            return Err(ApiError::bad_field(
                "path",
                format!("`{requested}` is not a folder (a PEFT bundle folder is expected)"),
            ));
        }
        Ok(real)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_under_the_adapters_dir() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("a")).unwrap();
        std::fs::write(root.path().join("file"), b"x").unwrap();
        let registry = Registry::new(Some(root.path())).unwrap();
        assert!(registry.resolve_path("a").is_ok());
        assert!(registry.resolve_path("./a").is_ok());
        for bad in ["../a", "/etc", "a/../../x", ""] {
            assert_eq!(registry.resolve_path(bad).unwrap_err().status, 400, "{bad}");
        }
        assert_eq!(registry.resolve_path("missing").unwrap_err().status, 404);
        assert_eq!(registry.resolve_path("file").unwrap_err().status, 400);
        #[cfg(unix)]
        {
            let outside = tempfile::tempdir().unwrap();
            std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
            assert_eq!(registry.resolve_path("link").unwrap_err().status, 403);
        }
        let closed = Registry::new(None).unwrap();
        assert_eq!(closed.resolve_path("a").unwrap_err().status, 403);
    }

    #[test]
    fn names() {
        assert!(Registry::check_name("sql-v2_1").is_ok());
        for bad in [
            "",
            "base",
            "__base__",
            "a/b",
            "a b",
            "v1.2",
            &"x".repeat(129),
        ] {
            assert!(Registry::check_name(bad).is_err(), "{bad}");
        }
    }
}
