//! Fusing LoRA files into a single-file Stable Diffusion checkpoint (`sd15.safetensors` in the
//! original LDM / SGM layout, as diffusers' `StableDiffusionPipeline.from_single_file` reads
//! it): each module's diffusers weight is found in the file as diffusers' conversion names it
//! ([`LdmLayout`]), and the deltas are the ones a diffusers folder gets
//! ([`fuse`](super::fuse)). The output is one file with the input's header (tensor names,
//! order, dtypes, metadata) and the fused tensors rewritten in place in their dtype; it is
//! written under a hidden name beside `output`, fsynced, and renamed over it, so `output`
//! holds the old file or the complete new one, never half of it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::LoraModule;
use super::fuse::{Component, Located, plan, read_model_header, resolved, rewrite};
use super::fuse_types::{FuseError, FuseReport, FusedComponent};
use super::ldm::LdmLayout;

/// A file being written under a hidden name beside its destination; removed if dropped before
/// [`commit`](Self::commit).
struct StagedFile {
    staging: PathBuf,
    dest: PathBuf,
    committed: bool,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl StagedFile {
    fn new(dest: &Path) -> Self {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let staging = parent(dest).join(format!(".{name}.tmp-{}-{n}", std::process::id()));
        StagedFile {
            staging,
            dest: dest.to_path_buf(),
            committed: false,
        }
    }

    /// Rename the (fsynced) staging file over the destination and fsync the folder.
    fn commit(mut self) -> Result<(), FuseError> {
        let io = |file: &Path| {
            let file = file.to_path_buf();
            move |source| FuseError::Io { file, source }
        };
        fs::rename(&self.staging, &self.dest).map_err(io(&self.dest))?;
        self.committed = true;
        let dir = parent(&self.dest);
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.staging);
        }
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// [`fuse`](super::fuse) for a single-file checkpoint `model`, written to the file `output`
/// (replaced if it exists; not the model itself, not a folder).
pub(super) fn fuse_file(
    model: &Path,
    loras: &[(PathBuf, f64)],
    output: &Path,
) -> Result<FuseReport, FuseError> {
    if resolved(output) == resolved(model) {
        return Err(FuseError::OutputInsideModel {
            output: output.to_path_buf(),
            model: model.to_path_buf(),
        });
    }
    if output.is_dir() {
        return Err(FuseError::OutputNotAFile {
            output: output.to_path_buf(),
        });
    }
    let header = read_model_header(model)?;
    let layout = LdmLayout::read(model, &header)?;
    let relative = PathBuf::from(output.file_name().unwrap_or(output.as_os_str()));
    let components = [Component {
        name: "checkpoint",
        relative: relative.clone(),
        path: model.to_path_buf(),
        header,
    }];
    let config = Ok(layout.unet_config);
    let locate = |module: &LoraModule| -> Option<Located> {
        let target = layout.locate(module)?;
        Some((0, target.key.clone(), target.rows))
    };
    let plan = plan(&components, loras, model, Some((model, &config)), &locate)?;

    let parent_dir = parent(output);
    fs::create_dir_all(&parent_dir).map_err(|source| FuseError::Io {
        file: parent_dir.clone(),
        source,
    })?;
    let staged = StagedFile::new(output);
    rewrite(&components[0], &plan.ops[0], &staged.staging, loras, &plan)?;
    staged.commit()?;

    // One report line per diffusers component, in the order of FUSE_COMPONENTS.
    let mut written: Vec<FusedComponent> = Vec::new();
    for (name, _) in super::FUSE_COMPONENTS {
        let mut tensors = 0;
        let mut dtypes: Vec<String> = Vec::new();
        for (tensor, ops) in &plan.ops[0] {
            if ops.first().is_some_and(|op| op.component == name) {
                tensors += 1;
                let dtype = format!("{:?}", components[0].header.tensors[tensor].dtype);
                if !dtypes.contains(&dtype) {
                    dtypes.push(dtype);
                }
            }
        }
        if tensors > 0 {
            written.push(FusedComponent {
                component: name.to_string(),
                file: relative.clone(),
                tensors,
                dtypes,
            });
        }
    }
    Ok(FuseReport {
        output: output.to_path_buf(),
        loras: plan.reports,
        components: written,
        copied_files: 0,
        dropped_files: Vec::new(),
    })
}

#[cfg(test)]
#[path = "single_file_tests.rs"]
mod tests;
