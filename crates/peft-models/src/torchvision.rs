//! torchvision state dicts (`torch.save(model.state_dict(), "x.pth")`, the files
//! `torchvision.models` downloads) as model sources: [`from_pretrained`](crate::from_pretrained)
//! on a `.pth` / `.pt` path reads the tensor shapes (burn-store's PyTorch reader: the pickle is
//! read as data, nothing is executed), recognizes the architecture from them, and loads the
//! weights through the same checks as a folder. torchvision files carry no config: the one
//! the shapes imply is used, and saving the model writes it as `config.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde_json::Value;

use crate::arch::Checkpoint;
use crate::auto::{Pretrained, Task};
use crate::config::HfConfig;
use crate::error::{ModelError, Result};
use crate::load::{is_pickle, total_elements};

/// The `config.json` a state dict's tensor shapes imply, if they are the architecture's.
type Detect = fn(&BTreeMap<String, Vec<usize>>) -> Option<Value>;

/// The torchvision architectures recognized from a state dict's shapes, by name.
const ARCHITECTURES: &[(&str, Detect)] = &[("mobilenet_v2", crate::mobilenet_v2::detect)];

/// The file `source` names when it is a PyTorch state dict (`.pth`, `.pt`).
pub fn state_dict_file(source: &str) -> Result<Option<&Path>> {
    let path = Path::new(source);
    if !is_pickle(path) {
        return Ok(None);
    }
    if !path.is_file() {
        return Err(ModelError::NotFound {
            id: source.into(),
            reason: "no such PyTorch state dict file".into(),
        });
    }
    Ok(Some(path))
}

/// Tensor name -> shape of a PyTorch state dict.
pub fn state_dict_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let reader = pytorch_reader::PytorchReader::new(path).map_err(|e| ModelError::Weights {
        file: path.to_path_buf(),
        reason: format!("not a readable PyTorch state dict: {e}"),
    })?;
    Ok(reader
        .tensors()
        .iter()
        .map(|(name, t)| (name.clone(), t.shape().to_vec()))
        .collect())
}

/// The config a torchvision state dict implies, naming the file when no architecture fits.
pub fn config_of(path: &Path, shapes: &BTreeMap<String, Vec<usize>>) -> Result<HfConfig> {
    let raw = ARCHITECTURES
        .iter()
        .find_map(|(_, detect)| detect(shapes))
        .ok_or_else(|| ModelError::Weights {
            file: path.to_path_buf(),
            reason: format!(
                "not a state dict of a torchvision architecture this crate reads ({}); found \
                 {} tensors, e.g. {}",
                ARCHITECTURES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
                shapes.len(),
                shapes
                    .keys()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
    HfConfig::from_value(raw, path)
}

/// Load the torchvision model of state dict `path` with `task`'s head (a head of another
/// class count than the file's starts fresh).
pub fn load(path: &Path, task: Task, device: &Device) -> Result<Pretrained> {
    let shapes = state_dict_shapes(path)?;
    let config = config_of(path, &shapes)?;
    let (needed, held) = (config.min_parameters(), total_elements(&shapes));
    if needed > held {
        return Err(ModelError::Weights {
            file: path.to_path_buf(),
            reason: format!("holds {held} values, fewer than the {needed} its shapes imply"),
        });
    }
    let weights = Checkpoint {
        files: vec![path.to_path_buf()],
        names: shapes.into_keys().collect(),
    };
    let task = config.resolve_task(task);
    let model = config.arch.build(&config, task, Some(&weights), device)?;
    Ok(Pretrained {
        model,
        config,
        dir: path.parent().map(PathBuf::from).unwrap_or_default(),
        tokenizer: None,
        gguf: None,
        chat_template: None,
        special_tokens: Default::default(),
    })
}
