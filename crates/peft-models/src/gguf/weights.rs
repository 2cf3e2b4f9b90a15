//! A GGUF file's tensors into a freshly built (lazy) model, under Hugging Face names: linear
//! layers and the token table keep their block format (peft-core's quantized sites), norms
//! and biases become dense f32 parameters. Llama's Q/K row permutation and Gemma's `1 + w`
//! norms are undone as transformers undoes them. Every parameter the model has must come from
//! the file (a fresh classification head excepted).

use std::collections::{BTreeMap, BTreeSet};

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Tensor, TensorData};
use peft_core::{Adaptable, SiteMut, SitePath};
use peft_ops::quant::{QuantFormat, QuantMatrix};

use super::reader::{GgufFile, GgufTensor};
use crate::arch::{GgufArch, GgufFix, GgufSpec};
use crate::auto::{HfModel, Task};
use crate::error::{ModelError, Result};
use crate::quantized;

/// Hugging Face parameter path (`model.layers.0.self_attn.q_proj.weight`) -> GGUF tensor name.
pub(super) fn names(spec: &GgufSpec, layers: usize) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for suffix in ["weight", "bias"] {
        for (gguf, hf) in spec.globals {
            out.insert(format!("{hf}.{suffix}"), format!("{gguf}.{suffix}"));
        }
        for n in 0..layers {
            for (gguf, hf) in spec.layer {
                out.insert(
                    format!("model.layers.{n}.{hf}.{suffix}"),
                    format!("blk.{n}.{gguf}.{suffix}"),
                );
            }
        }
    }
    out
}

/// The tensor `name` as a matrix of `rows` x `cols`, with the converter's changes undone.
struct Reader<'a> {
    file: &'a GgufFile,
    fix: GgufFix,
    heads: usize,
    kv_heads: usize,
}

impl Reader<'_> {
    fn matrix(&self, tensor: &GgufTensor) -> Result<QuantMatrix> {
        let (rows, cols) = tensor.matrix();
        let bytes = self.file.tensor_bytes(tensor)?;
        let matrix = QuantMatrix::new(tensor.format, rows, cols, bytes)
            .map_err(|e| self.file.error(format!("tensor `{}`: {e}", tensor.name)))?;
        let heads = if tensor.name.contains(".attn_q.") {
            Some(self.heads)
        } else if tensor.name.contains(".attn_k.") {
            Some(self.kv_heads)
        } else {
            None
        };
        match (self.fix, heads) {
            (GgufFix::LlamaRopePermute, Some(heads)) if tensor.dims.len() == 2 => {
                let order = unpermute(rows, heads).ok_or_else(|| {
                    self.file.error(format!(
                        "tensor `{}` has {rows} rows, not a whole number of pairs per head for \
                         {heads} heads",
                        tensor.name
                    ))
                })?;
                matrix
                    .select_rows(&order)
                    .map_err(|e| self.file.error(format!("tensor `{}`: {e}", tensor.name)))
            }
            _ => Ok(matrix),
        }
    }

    /// The values of a small tensor (a norm, a bias) as f32, Gemma's `1 + w` undone.
    fn values(&self, tensor: &GgufTensor) -> Result<Vec<f32>> {
        let (rows, cols) = tensor.matrix();
        let bytes = self.file.tensor_bytes(tensor)?;
        let matrix = QuantMatrix::new(tensor.format, rows, cols, bytes)
            .map_err(|e| self.file.error(format!("tensor `{}`: {e}", tensor.name)))?;
        let mut values = matrix.dequantize();
        if self.fix == GgufFix::GemmaNormPlusOne && tensor.name.contains("norm.weight") {
            values.iter_mut().for_each(|v| *v -= 1.0);
        }
        Ok(values)
    }
}

/// transformers' `_reverse_permute_weights`: `w.reshape(h, rows/h/2, 2, cols).swapaxes(2, 1)`,
/// as the row order it produces: new row `(head, i, j)` (pair `j`, index `i`) is old row
/// `(head, j, i)`.
pub(super) fn unpermute(rows: usize, heads: usize) -> Option<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads * 2) {
        return None;
    }
    let half = rows / heads / 2;
    let mut order = Vec::with_capacity(rows);
    for h in 0..heads {
        for i in 0..2 {
            for j in 0..half {
                // Old layout [h, half, 2]: index h*2*half + j*2 + i.
                order.push(h * 2 * half + j * 2 + i);
            }
        }
    }
    Some(order)
}

/// Load every tensor of `file` into `model`.
pub(super) fn fill(
    model: &mut HfModel,
    file: &GgufFile,
    spec: &GgufSpec,
    arch: &GgufArch,
    task: Task,
    device: &Device,
) -> Result<()> {
    let arch_key = |key: &str| {
        file.get(&format!("{}.{key}", arch.name))
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as usize
    };
    let reader = Reader {
        file,
        fix: arch.fix,
        heads: arch_key("attention.head_count"),
        kv_heads: arch_key("attention.head_count_kv").max(1),
    };
    let names = names(spec, model.num_layers());
    let mut loaded = BTreeSet::new();
    let mut error = None;
    // Sites: linear layers and the token table, kept in their block format.
    model.visit_sites_mut(&mut SitePath::root(), &mut |path, site| {
        if error.is_some() {
            return;
        }
        let key = format!("{path}.weight");
        let Some(tensor) = names.get(&key).and_then(|n| file.tensor(n)) else {
            return;
        };
        let result = (|| -> Result<()> {
            let matrix = reader.matrix(tensor)?;
            match site {
                SiteMut::Linear(l) => {
                    let [d_in, d_out] = l.dims();
                    expect_shape(file, tensor, [d_out, d_in], &matrix)?;
                    if matrix.format() == QuantFormat::F32 {
                        let dense = quantized::dense(&matrix, device).transpose();
                        l.weight = Param::initialized(l.weight.id, dense);
                    } else {
                        l.set_quantized_base(quantized::base(matrix), device);
                    }
                }
                SiteMut::Embedding(e) => {
                    expect_shape(file, tensor, e.dims(), &matrix)?;
                    if matrix.format() == QuantFormat::F32 {
                        let dense = quantized::dense(&matrix, device);
                        e.weight = Param::initialized(e.weight.id, dense);
                    } else {
                        e.set_quantized_base(quantized::base(matrix), device);
                    }
                }
                _ => return Ok(()),
            }
            loaded.insert(key.clone());
            Ok(())
        })();
        if let Err(e) = result {
            error = Some(e);
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    // Everything else (norms, biases): dense parameters.
    let mut mapper = Dense {
        reader: &reader,
        names: &names,
        loaded: &mut loaded,
        path: Vec::new(),
        missing: Vec::new(),
        error: None,
        device,
        fresh_head: matches!(task, Task::SequenceClassification { .. }),
    };
    // `Module::map` takes the model by value; a clone shares every tensor.
    *model = model.clone().map(&mut mapper);
    if let Some(e) = mapper.error {
        return Err(e);
    }
    if !mapper.missing.is_empty() {
        return Err(file.error(format!(
            "{} parameter(s) of the model are not in the file, e.g. {}",
            mapper.missing.len(),
            mapper.missing[..mapper.missing.len().min(5)].join(", ")
        )));
    }
    let unused: Vec<&str> = file
        .tensors
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| !names.iter().any(|(k, v)| v == n && loaded.contains(k)))
        .collect();
    for name in unused {
        log::debug!(
            "{}: tensor `{name}` is not used by this model",
            file.path.display()
        );
    }
    Ok(())
}

fn expect_shape(
    file: &GgufFile,
    tensor: &GgufTensor,
    [rows, cols]: [usize; 2],
    matrix: &QuantMatrix,
) -> Result<()> {
    if matrix.rows() != rows || matrix.cols() != cols {
        return Err(file.error(format!(
            "tensor `{}` is [{}, {}] (rows, values per row), but the model built from the \
             metadata needs [{rows}, {cols}]",
            tensor.name,
            matrix.rows(),
            matrix.cols()
        )));
    }
    Ok(())
}

/// Loads the non-site parameters by path; records what the file lacks.
struct Dense<'a> {
    reader: &'a Reader<'a>,
    names: &'a BTreeMap<String, String>,
    loaded: &'a mut BTreeSet<String>,
    path: Vec<String>,
    missing: Vec<String>,
    error: Option<ModelError>,
    device: &'a Device,
    fresh_head: bool,
}

impl ModuleMapper for Dense<'_> {
    fn enter_module(&mut self, name: &str, container: &str) {
        if !container.starts_with("Enum:") {
            self.path.push(name.to_string());
        }
    }

    fn exit_module(&mut self, _: &str, container: &str) {
        if !container.starts_with("Enum:") {
            self.path.pop();
        }
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        // Burn's norms call their parameters gamma / beta; the file says weight / bias.
        let mut segments = self.path.clone();
        if let Some(last) = segments.last_mut() {
            match last.as_str() {
                "gamma" => *last = "weight".into(),
                "beta" => *last = "bias".into(),
                _ => {}
            }
        }
        let key = segments.join(".");
        if self.loaded.contains(&key) || self.error.is_some() {
            return param;
        }
        let shape = param.lazy_shape();
        if shape.num_elements() == 0 {
            // A quantized site's empty stand-in.
            return param;
        }
        let tensor = self
            .names
            .get(&key)
            .and_then(|name| self.reader.file.tensor(name));
        let Some(tensor) = tensor else {
            let head = self.fresh_head && key.starts_with("score.");
            if !head && !param.is_initialized() {
                self.missing.push(key);
            }
            return param;
        };
        match self.reader.values(tensor) {
            Ok(values) if values.len() == shape.num_elements() => {
                let data = TensorData::new(values, shape);
                self.loaded.insert(key);
                Param::initialized(param.id, Tensor::from_data(data, self.device))
            }
            Ok(values) => {
                self.error = Some(self.reader.file.error(format!(
                    "tensor `{}` holds {} values, but `{key}` needs {:?}",
                    tensor.name,
                    values.len(),
                    shape.to_vec()
                )));
                param
            }
            Err(e) => {
                self.error = Some(e);
                param
            }
        }
    }
}
