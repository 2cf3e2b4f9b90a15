//! Atomic saves, one way for every writer of the project (adapter bundles, merged model
//! folders, checkpoints, run summaries, forward outputs).
//!
//! A folder is written in full under a hidden staging name beside its destination, every file
//! and folder in it is fsynced, and only then does it take the destination's name. On Linux the
//! swap is one `renameat2(RENAME_EXCHANGE)`, so a reader (or a crash at any instant) sees either
//! the complete old folder or the complete new one, never a config from one save with weights
//! from another. Elsewhere (or on a filesystem without the exchange) the old folder is renamed
//! aside first; a crash in the gap between the two renames leaves the old folder intact under
//! `.<name>.old-*` beside the destination.
//!
//! ```
//! use peft_core::atomic::{Previous, StagedDir};
//!
//! let root = tempfile::tempdir().unwrap();
//! let dest = root.path().join("bundle");
//! let staged = StagedDir::create(&dest).unwrap();
//! staged.write("adapter_config.json", b"{}").unwrap();
//! staged.write("adapter_model.safetensors", b"...").unwrap();
//! staged.commit(Previous::KeepOtherEntries).unwrap();
//! assert_eq!(std::fs::read(dest.join("adapter_config.json")).unwrap(), b"{}");
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// An I/O failure at a path.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct IoAt {
    /// The file or folder involved.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> IoAt + '_ {
    move |source| IoAt {
        path: path.to_path_buf(),
        source,
    }
}

/// What happens to entries of an existing destination folder that the new save does not write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Previous {
    /// The folder is replaced as a whole (a model folder, a checkpoint).
    Replace,
    /// Entries the new save does not write are kept (an adapter bundle folder also holds the
    /// bundles of other adapters in sub-folders, as PEFT lays them out, and perhaps a README).
    KeepOtherEntries,
}

/// A folder being written under a hidden name beside `dest`; [`commit`](Self::commit) puts it
/// in place. Dropped without committing, it is removed and `dest` is untouched.
#[derive(Debug)]
pub struct StagedDir {
    dest: PathBuf,
    staging: PathBuf,
    committed: bool,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh hidden sibling name of `dest`: `.<name>.<tag>-<pid>-<n>`.
fn sibling(dest: &Path, tag: &str) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    parent_of(dest).join(format!(".{name}.{tag}-{}-{n}", std::process::id()))
}

fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn sync_path(path: &Path) -> Result<(), IoAt> {
    fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(at(path))
}

/// fsync every file and folder under `dir` (the folder itself last).
fn sync_tree(dir: &Path) -> Result<(), IoAt> {
    for entry in fs::read_dir(dir).map_err(at(dir))? {
        let entry = entry.map_err(at(dir))?;
        let kind = entry.file_type().map_err(at(&entry.path()))?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            sync_path(&entry.path())?;
        }
    }
    sync_path(dir)
}

/// Make `to` hold the same entries as `from` without copying data where the filesystem allows
/// (hard links), else by copying.
fn link_tree(from: &Path, to: &Path) -> Result<(), IoAt> {
    let kind = fs::symlink_metadata(from).map_err(at(from))?.file_type();
    if kind.is_dir() {
        fs::create_dir(to).map_err(at(to))?;
        for entry in fs::read_dir(from).map_err(at(from))? {
            let entry = entry.map_err(at(from))?;
            link_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else if kind.is_symlink() {
        let target = fs::read_link(from).map_err(at(from))?;
        symlink(&target, to).map_err(at(to))
    } else if fs::hard_link(from, to).is_ok() {
        Ok(())
    } else {
        fs::copy(from, to).map(|_| ()).map_err(at(from))
    }
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    fs::copy(target, link).map(|_| ())
}

/// Swap two existing paths in one step, where the platform can.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    match renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE) {
        Ok(()) => Ok(true),
        // Filesystems without RENAME_EXCHANGE: fall back to two renames.
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<bool> {
    Ok(false)
}

/// Whether the process `pid` still runs (Linux: `/proc/<pid>`; elsewhere assume it does, so
/// nothing of a live writer is touched).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// Clean up after writers that died mid-save beside `dest`: their hidden staging, temporary
/// and trash entries are removed, and if one died between the two renames of the fallback swap
/// of `dest` itself (so `dest` is missing), the previous folder it had moved aside is put back.
fn recover(dest: &Path) {
    let Some(name) = dest.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let Ok(entries) = fs::read_dir(parent_of(dest)) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        // `.<name>.<tag>-<pid>-<n>`, as `sibling` makes them.
        let Some((owner, tail)) = file.strip_prefix('.').and_then(|f| f.rsplit_once('.')) else {
            continue;
        };
        let mut parts = tail.split('-');
        let (Some(tag), Some(pid), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        match tag {
            "staging" | "tmp" | "trash" => {
                let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
            }
            "old"
                if owner == name
                    && fs::symlink_metadata(dest).is_err()
                    && fs::rename(&path, dest).is_ok() =>
            {
                log::warn!(
                    "{}: restored the previous folder left by an interrupted save",
                    dest.display()
                );
            }
            // The swap completed (`dest` is there): the aside copy is the stale previous one.
            "old" if owner == name && fs::symlink_metadata(dest).is_ok() => {
                let _ = fs::remove_dir_all(&path);
            }
            _ => {}
        }
    }
}

impl StagedDir {
    /// Start writing the folder `dest` (its parent folders are created). Leftovers of
    /// writers of `dest` that were killed mid-save are cleaned up first.
    pub fn create(dest: &Path) -> Result<Self, IoAt> {
        let parent = parent_of(dest);
        fs::create_dir_all(&parent).map_err(at(&parent))?;
        recover(dest);
        let staging = sibling(dest, "staging");
        fs::create_dir(&staging).map_err(at(&staging))?;
        Ok(Self {
            dest: dest.to_path_buf(),
            staging,
            committed: false,
        })
    }

    /// The staging folder: write files here (or with [`write`](Self::write)).
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// The folder this will become.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Write `bytes` to `relative` inside the staging folder (sub-folders are created).
    pub fn write(&self, relative: impl AsRef<Path>, bytes: &[u8]) -> Result<(), IoAt> {
        let file = self.staging.join(relative);
        if let Some(parent) = file.parent() {
            fs::create_dir_all(parent).map_err(at(parent))?;
        }
        let mut f = fs::File::create(&file).map_err(at(&file))?;
        f.write_all(bytes).map_err(at(&file))
    }

    /// Put the staged folder at its destination: fsync everything in it, carry over what
    /// `previous` says from an existing destination, swap, and remove the old folder.
    pub fn commit(mut self, previous: Previous) -> Result<(), IoAt> {
        let exists = fs::symlink_metadata(&self.dest).is_ok();
        if exists && previous == Previous::KeepOtherEntries {
            if !self.dest.is_dir() {
                return Err(IoAt {
                    path: self.dest.clone(),
                    source: std::io::Error::other("exists and is not a folder"),
                });
            }
            for entry in fs::read_dir(&self.dest).map_err(at(&self.dest))? {
                let entry = entry.map_err(at(&self.dest))?;
                let to = self.staging.join(entry.file_name());
                if fs::symlink_metadata(&to).is_err() {
                    link_tree(&entry.path(), &to)?;
                }
            }
        }
        sync_tree(&self.staging)?;
        let parent = parent_of(&self.dest);
        if !exists {
            fs::rename(&self.staging, &self.dest).map_err(at(&self.dest))?;
            self.committed = true;
            return sync_path(&parent);
        }
        if exchange(&self.staging, &self.dest).map_err(at(&self.dest))? {
            // The staging name now holds the previous folder.
            self.committed = true;
            sync_path(&parent)?;
            if let Err(e) = fs::remove_dir_all(&self.staging) {
                log::warn!(
                    "{}: could not remove the previous folder: {e}",
                    self.staging.display()
                );
            }
            return Ok(());
        }
        let aside = sibling(&self.dest, "old");
        fs::rename(&self.dest, &aside).map_err(at(&self.dest))?;
        if let Err(source) = fs::rename(&self.staging, &self.dest) {
            let _ = fs::rename(&aside, &self.dest);
            return Err(IoAt {
                path: self.dest.clone(),
                source,
            });
        }
        self.committed = true;
        sync_path(&parent)?;
        if let Err(e) = fs::remove_dir_all(&aside) {
            log::warn!(
                "{}: could not remove the previous folder: {e}",
                aside.display()
            );
        }
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.staging);
        }
    }
}

/// Remove the folder `path` so that it is either there whole or gone, never half deleted: it
/// is renamed to a hidden name first (one step), then deleted. A writer killed while deleting
/// leaves only the hidden folder, which the next save beside it removes.
pub fn remove_dir(path: &Path) -> Result<(), IoAt> {
    let trash = sibling(path, "trash");
    fs::rename(path, &trash).map_err(at(path))?;
    fs::remove_dir_all(&trash).map_err(at(&trash))
}

/// Replace the single file `path` with `bytes`: written and fsynced under a hidden name in the
/// same folder, then renamed over it (the folder is fsynced too).
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let file = dir.path().join("results.json");
/// peft_core::atomic::write_file(&file, b"{\"ok\": true}").unwrap();
/// assert_eq!(std::fs::read(&file).unwrap(), b"{\"ok\": true}");
/// ```
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), IoAt> {
    let parent = parent_of(path);
    fs::create_dir_all(&parent).map_err(at(&parent))?;
    recover(path);
    let staging = sibling(path, "tmp");
    let result = (|| {
        let mut f = fs::File::create(&staging).map_err(at(&staging))?;
        f.write_all(bytes).map_err(at(&staging))?;
        f.sync_all().map_err(at(&staging))?;
        fs::rename(&staging, path).map_err(at(path))?;
        sync_path(&parent)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&staging);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn replace_swaps_the_whole_folder_and_leaves_no_staging() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("m");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("old.txt"), "old").unwrap();
        let staged = StagedDir::create(&dest).unwrap();
        staged.write("new.txt", b"new").unwrap();
        staged.commit(Previous::Replace).unwrap();
        assert_eq!(names(&dest), ["new.txt"]);
        assert_eq!(names(root.path()), ["m"]);
    }

    #[test]
    fn keep_other_entries_carries_sub_folders_over() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("bundle");
        fs::create_dir_all(dest.join("second")).unwrap();
        fs::write(dest.join("second/adapter_config.json"), "2").unwrap();
        fs::write(dest.join("adapter_config.json"), "old").unwrap();
        let staged = StagedDir::create(&dest).unwrap();
        staged.write("adapter_config.json", b"new").unwrap();
        staged.commit(Previous::KeepOtherEntries).unwrap();
        assert_eq!(
            fs::read_to_string(dest.join("adapter_config.json")).unwrap(),
            "new"
        );
        assert_eq!(
            fs::read_to_string(dest.join("second/adapter_config.json")).unwrap(),
            "2"
        );
        assert_eq!(names(root.path()), ["bundle"]);
    }

    #[test]
    fn dropping_without_commit_changes_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("bundle");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("a"), "old").unwrap();
        {
            let staged = StagedDir::create(&dest).unwrap();
            staged.write("a", b"new").unwrap();
        }
        assert_eq!(fs::read_to_string(dest.join("a")).unwrap(), "old");
        assert_eq!(names(root.path()), ["bundle"]);
    }

    #[test]
    fn a_file_in_place_of_the_folder_is_an_error_for_bundles() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("bundle");
        fs::write(&dest, "not a folder").unwrap();
        let staged = StagedDir::create(&dest).unwrap();
        staged.write("a", b"x").unwrap();
        assert!(staged.commit(Previous::KeepOtherEntries).is_err());
        assert_eq!(fs::read_to_string(&dest).unwrap(), "not a folder");
        assert_eq!(names(root.path()), ["bundle"]);
    }
}
