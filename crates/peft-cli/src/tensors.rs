//! Reading model inputs from and writing outputs to safetensors files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use peft_models::ModelInputs;
use safetensors::{Dtype, SafeTensors};

/// A problem with an input file: its path and what is wrong (expected vs found).
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", file.display())]
pub struct InputError {
    /// The file.
    pub file: PathBuf,
    /// What is wrong and what to do.
    pub message: String,
}

fn input_error(file: &Path, message: impl Into<String>) -> InputError {
    InputError {
        file: file.to_path_buf(),
        message: message.into(),
    }
}

/// Values and shape of an int64 tensor.
type IntTensor = (Vec<i64>, Vec<usize>);

/// Read `input_ids` and the optional `attention_mask` / `token_type_ids` (int64 `[batch, seq]`).
pub fn read_inputs(file: &Path, device: &Device) -> Result<ModelInputs, InputError> {
    let bytes = std::fs::read(file).map_err(|e| input_error(file, format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| input_error(file, format!("not a valid safetensors file: {e}")))?;
    let names: Vec<String> = st.names().into_iter().map(String::from).collect();
    let read = |name: &str, shape: Option<&[usize]>| -> Result<Option<IntTensor>, InputError> {
        let Ok(view) = st.tensor(name) else {
            return Ok(None);
        };
        if view.dtype() != Dtype::I64 {
            return Err(input_error(
                file,
                format!(
                    "tensor `{name}` has dtype {:?}, expected I64 (torch.int64)",
                    view.dtype()
                ),
            ));
        }
        if view.shape().len() != 2 {
            return Err(input_error(
                file,
                format!(
                    "tensor `{name}` has shape {:?}, expected [batch, seq]",
                    view.shape()
                ),
            ));
        }
        if let Some(expected) = shape
            && view.shape() != expected
        {
            return Err(input_error(
                file,
                format!(
                    "tensor `{name}` has shape {:?}, expected {expected:?} like input_ids",
                    view.shape()
                ),
            ));
        }
        let values = view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        Ok(Some((values, view.shape().to_vec())))
    };
    let (ids, shape) = read("input_ids", None)?.ok_or_else(|| {
        input_error(
            file,
            format!("no tensor `input_ids`; found: {}", names.join(", ")),
        )
    })?;
    let to_tensor =
        |(v, s): (Vec<i64>, Vec<usize>)| Tensor::<2, Int>::from_data(TensorData::new(v, s), device);
    let attention_mask = read("attention_mask", Some(&shape))?.map(to_tensor);
    let token_type_ids = read("token_type_ids", Some(&shape))?.map(to_tensor);
    Ok(ModelInputs {
        input_ids: to_tensor((ids, shape)),
        attention_mask,
        token_type_ids,
        pixel_values: None,
    })
}

/// Write float32 tensors to `file` atomically.
pub fn write_outputs(file: &Path, tensors: BTreeMap<String, TensorData>) -> anyhow::Result<()> {
    let bytes = peft_core::bundle::encode_safetensors(&tensors)?;
    peft_core::atomic::write_file(file, &bytes)?;
    Ok(())
}
