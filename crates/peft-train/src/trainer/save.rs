//! Writing a run's result: the trained adapters as PEFT bundles, or a fully fine-tuned model
//! through a [`ModelExport`]; the files a caller asked for beside every bundle.

use std::path::{Path, PathBuf};

use burn::module::Module;
use peft_core::Adaptable;
use peft_models::HfModel;

use super::Trainer;
use crate::checkpoint;
use crate::error::{Result, TrainError};

/// How full fine-tuning writes the whole model into a folder (`best/`, `model/`).
pub trait ModelExport<M>: Send + Sync {
    /// Write `model` into `dir`.
    fn save(&self, model: &M, dir: &Path) -> Result<()>;
}

/// A zoo model written as a Hugging Face model folder ([`peft_models::save_pretrained`]).
#[derive(Debug, Clone)]
pub struct FullExport {
    /// The base model's config.
    pub config: peft_models::HfConfig,
    /// The base model's folder (tokenizer files are copied from it).
    pub source_dir: PathBuf,
    /// Class names (classification), written as `id2label` / `label2id`.
    pub labels: Option<Vec<String>>,
}

impl ModelExport<HfModel> for FullExport {
    fn save(&self, model: &HfModel, dir: &Path) -> Result<()> {
        peft_models::save_pretrained(
            model,
            &self.config,
            &self.source_dir,
            dir,
            self.labels.as_deref(),
        )
        .map(|_| ())
        .map_err(|e| TrainError::Export {
            dir: dir.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

/// Any closure `Fn(&M, &Path) -> Result<()>` exports too.
impl<M, F> ModelExport<M> for F
where
    F: Fn(&M, &Path) -> Result<()> + Send + Sync,
{
    fn save(&self, model: &M, dir: &Path) -> Result<()> {
        self(model, dir)
    }
}

impl<M: Adaptable + Module> Trainer<M> {
    /// Save the trained adapters (PEFT bundles) or, for full fine-tuning, the whole model
    /// (the [`ModelExport`]) to `dir`, with the builder's
    /// [`bundle_file`](super::TrainerBuilder::bundle_file)s beside every bundle.
    pub fn save_result(&self, dir: &Path) -> Result<()> {
        // No bundle or model folder ever holds a non-finite tensor.
        if let Some(parameter) = checkpoint::non_finite_parameter(&self.model) {
            return Err(TrainError::NonFiniteParameter {
                step: None,
                parameter,
                last_checkpoint: checkpoint::latest(&self.output_dir.join("checkpoints")),
            });
        }
        if self.is_full_fine_tuning() {
            let export = self.export.as_ref().ok_or_else(|| TrainError::Config {
                key: "full_export".into(),
                reason: "full fine-tuning writes the whole model: say how with `.full_export(..)`"
                    .into(),
            })?;
            export.save(self.model.model(), dir)?;
            return self.write_bundle_files(dir);
        }
        for adapter in &self.adapters {
            self.model.save_adapter(dir, adapter)?;
        }
        // Beside every bundle (several adapters each have their own folder) and in the result
        // folder itself, so that whoever loads any of them finds the class names and how the
        // data was read.
        let folders = self
            .adapters
            .iter()
            .map(|a| peft_core::bundle::adapter_dir(dir, a))
            .filter(|folder| folder != dir);
        for folder in std::iter::once(dir.to_path_buf()).chain(folders) {
            self.write_bundle_files(&folder)?;
        }
        Ok(())
    }

    fn write_bundle_files(&self, folder: &Path) -> Result<()> {
        for (name, contents) in &self.bundle_files {
            peft_core::atomic::write_file(&folder.join(name), contents).map_err(|e| {
                TrainError::Io {
                    file: e.path,
                    source: e.source,
                }
            })?;
        }
        Ok(())
    }
}
