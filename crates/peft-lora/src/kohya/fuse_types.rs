//! What a fuse ([`fuse`](super::fuse)) reads and reports: the components it fuses, its typed
//! errors, and its report.

use std::path::PathBuf;

use peft_core::atomic::IoAt;

use super::KohyaError;

/// The diffusers pipeline components a LoRA file can adapt, and their weights file.
pub const FUSE_COMPONENTS: [(&str, &str); 3] = [
    ("unet", "diffusion_pytorch_model.safetensors"),
    ("text_encoder", "model.safetensors"),
    ("text_encoder_2", "model.safetensors"),
];

/// Why a fuse failed; every variant names the file involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FuseError {
    /// A LoRA file that cannot be read or is not a valid SD LoRA file.
    #[error(transparent)]
    Lora(#[from] KohyaError),
    /// Reading or writing a file failed.
    #[error("{}: {source}", file.display())]
    Io {
        /// The file or folder.
        file: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A component weights file that is not a well-formed safetensors file.
    #[error("{}: corrupt or truncated safetensors file: {reason}", file.display())]
    CorruptModel {
        /// The component file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model folder has none of the component weights files.
    #[error(
        "{}: not a diffusers model folder: none of unet/diffusion_pytorch_model.safetensors, text_encoder/model.safetensors, text_encoder_2/model.safetensors is there (sharded or .bin weights are not read)",
        dir.display()
    )]
    NoComponents {
        /// The model folder.
        dir: PathBuf,
    },
    /// A LoRA weight that is NaN or infinite.
    #[error("{}: weight {weight} is not a finite number", file.display())]
    BadWeight {
        /// The LoRA file.
        file: PathBuf,
        /// The weight given.
        weight: f64,
    },
    /// A DoRA module (`dora_scale`, `lora_magnitude_vector`).
    #[error("{}: module `{module}` has a DoRA magnitude: DoRA LoRA files cannot be fused yet", file.display())]
    Dora {
        /// The LoRA file.
        file: PathBuf,
        /// The module, as named in the file.
        module: String,
    },
    /// None of a LoRA file's modules adapts a weight of the model (folder or single file).
    #[error(
        "{}: none of its {modules} module(s) matches a weight of the model {} (e.g. `{example}`); is it a LoRA for another model?",
        file.display(),
        model.display()
    )]
    NoMatch {
        /// The LoRA file.
        file: PathBuf,
        /// The model folder.
        model: PathBuf,
        /// How many modules the file has.
        modules: usize,
        /// One module name and the weight it was looked for as.
        example: String,
    },
    /// A module whose delta does not have the shape of the weight it adapts.
    #[error(
        "{}: module `{module}`: the {component}'s `{tensor}` has shape {expected:?}, the LoRA module's delta (up @ down) has shape {found:?}",
        file.display()
    )]
    ShapeMismatch {
        /// The LoRA file.
        file: PathBuf,
        /// The module, as named in the file.
        module: String,
        /// The component (`unet`, `text_encoder`, `text_encoder_2`).
        component: &'static str,
        /// The weight's tensor name.
        tensor: String,
        /// The weight's shape.
        expected: Box<[usize]>,
        /// The delta's shape.
        found: Box<[usize]>,
    },
    /// An adapted weight stored in a dtype other than F16 / BF16 / F32.
    #[error("{}: `{tensor}` has dtype {dtype}; only F16, BF16 and F32 weights can be fused", file.display())]
    ModelDtype {
        /// The component weights file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: String,
    },
    /// A LoRA tensor in a dtype other than F16 / BF16 / F32 / F64.
    #[error("{}: `{key}` has dtype {dtype}; LoRA weights must be F16, BF16, F32 or F64", file.display())]
    LoraDtype {
        /// The LoRA file.
        file: PathBuf,
        /// The tensor.
        key: String,
        /// Its dtype.
        dtype: String,
    },
    /// The output is the model (folder or file), inside it, or holds it.
    #[error("{}: the output may not be the model {}, inside it or around it", output.display(), model.display())]
    OutputInsideModel {
        /// The output folder.
        output: PathBuf,
        /// The model folder.
        model: PathBuf,
    },
    /// A `--model` file that is not a single-file Stable Diffusion checkpoint this reads (no
    /// `model.diffusion_model.` UNet, or one whose blocks fit no SD UNet geometry).
    #[error("{}: not a single-file Stable Diffusion checkpoint that can be fused: {reason}", file.display())]
    UnknownLayout {
        /// The checkpoint file.
        file: PathBuf,
        /// What does not fit.
        reason: String,
    },
    /// The output for a single-file checkpoint is a folder.
    #[error("{}: is a folder; the fused single-file checkpoint is written as one file (give a `.safetensors` path)", output.display())]
    OutputNotAFile {
        /// The output path.
        output: PathBuf,
    },
    /// The output path holds something other than a diffusers model folder.
    #[error("{}: exists and does not hold a diffusers model (no model_index.json); not replaced", output.display())]
    OutputNotAModel {
        /// The output path.
        output: PathBuf,
    },
}

impl FuseError {
    /// Whether the error is about the input (a bad file, weight or folder) rather than a failed
    /// read or write.
    pub fn is_bad_input(&self) -> bool {
        match self {
            FuseError::Io { .. } => false,
            // A LoRA file that is not there is a wrong argument; one that cannot be read, not.
            FuseError::Lora(KohyaError::Io { source, .. }) => {
                source.kind() == std::io::ErrorKind::NotFound
            }
            _ => true,
        }
    }
}

impl From<IoAt> for FuseError {
    fn from(e: IoAt) -> Self {
        FuseError::Io {
            file: e.path,
            source: e.source,
        }
    }
}

/// One LoRA file's part in a fuse.
#[derive(Debug, Clone, PartialEq)]
pub struct FusedLora {
    /// The LoRA file.
    pub file: PathBuf,
    /// Its weight (diffusers' `adapter_weights`).
    pub weight: f64,
    /// How many of its modules were fused.
    pub fused: usize,
    /// Its modules that match no weight of the model (as named in the file), skipped as
    /// diffusers skips them (PEFT warns about unexpected keys).
    pub skipped: Vec<String>,
}

/// One component weights file written.
#[derive(Debug, Clone, PartialEq)]
pub struct FusedComponent {
    /// `unet`, `text_encoder` or `text_encoder_2`.
    pub component: String,
    /// The file, relative to the folder (`unet/diffusion_pytorch_model.safetensors`); for a
    /// single-file checkpoint, the output file's name (one entry per component fused there).
    pub file: PathBuf,
    /// How many of its tensors changed.
    pub tensors: usize,
    /// Their dtype(s), as stored.
    pub dtypes: Vec<String>,
}

/// What [`fuse`](super::fuse) did.
#[derive(Debug, Clone, PartialEq)]
pub struct FuseReport {
    /// The folder written (the file, for a single-file checkpoint).
    pub output: PathBuf,
    /// Each LoRA file, in the order given.
    pub loras: Vec<FusedLora>,
    /// The component files with fused weights.
    pub components: Vec<FusedComponent>,
    /// How many files were copied unchanged (0 for a single-file checkpoint).
    pub copied_files: usize,
    /// Other weights files beside a fused component file (`*.fp16.safetensors` variants, `.bin`
    /// copies: they would still hold the unfused weights), left out of the output; relative
    /// paths.
    pub dropped_files: Vec<PathBuf>,
}
