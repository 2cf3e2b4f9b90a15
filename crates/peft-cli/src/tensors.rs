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

/// Read `input_ids` and the optional `attention_mask` / `token_type_ids` (int64 `[batch, seq]`),
/// or an image model's `pixel_values` (float32 `[batch, channels, height, width]`, normalized as
/// its preprocessor does).
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
    if let Ok(view) = st.tensor("pixel_values") {
        return read_pixels(file, &view, device).map(ModelInputs::images);
    }
    let (ids, shape) = read("input_ids", None)?.ok_or_else(|| {
        input_error(
            file,
            format!(
                "no tensor `input_ids` (a text model's int64 [batch, seq]) or `pixel_values` \
                 (an image model's float32 [batch, channels, height, width]); found: {}",
                names.join(", ")
            ),
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

/// `pixel_values`: float32, four dimensions (the model checks the channels and the size).
fn read_pixels(
    file: &Path,
    view: &safetensors::tensor::TensorView<'_>,
    device: &Device,
) -> Result<Tensor<4>, InputError> {
    if view.dtype() != Dtype::F32 {
        return Err(input_error(
            file,
            format!(
                "tensor `pixel_values` has dtype {:?}, expected F32 (torch.float32)",
                view.dtype()
            ),
        ));
    }
    let &[b, c, h, w] = view.shape() else {
        return Err(input_error(
            file,
            format!(
                "tensor `pixel_values` has shape {:?}, expected [batch, channels, height, width]",
                view.shape()
            ),
        ));
    };
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|x| f32::from_le_bytes(x.try_into().expect("4 bytes")))
        .collect();
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(input_error(
            file,
            format!("tensor `pixel_values` holds a non-finite value at flat index {i}"),
        ));
    }
    Ok(Tensor::from_data(
        TensorData::new(values, [b, c, h, w]),
        device,
    ))
}

/// Write float32 tensors to `file` atomically.
pub fn write_outputs(file: &Path, tensors: BTreeMap<String, TensorData>) -> anyhow::Result<()> {
    let bytes = peft_core::bundle::encode_safetensors(&tensors)?;
    peft_core::atomic::write_file(file, &bytes)?;
    Ok(())
}
