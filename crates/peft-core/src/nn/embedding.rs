use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::module::embedding;
use burn::tensor::{DType, Device, Int, Tensor};

use crate::adapter::{AdapterState, BaseWeights};
use crate::nn::quantized::{QuantizedBase, placeholder};
use crate::nn::{ForwardContext, ModuleCopy};

/// Configuration of an adapter-aware [`Embedding`]; the same fields and builder as
/// `burn::nn::EmbeddingConfig`.
///
/// ```
/// use burn::tensor::Device;
/// use peft_core::nn::EmbeddingConfig;
///
/// let table = EmbeddingConfig::new(100, 8).init(&Device::flex());
/// assert_eq!(table.weight.dims(), [100, 8]);
/// ```
#[derive(Config, Debug)]
pub struct EmbeddingConfig {
    /// The number of embedding vectors.
    pub n_embedding: usize,
    /// The size of each vector.
    pub d_model: usize,
    /// The type of function used to initialize neural network parameters.
    #[config(default = "Initializer::Normal{mean:0.0, std:1.0}")]
    pub initializer: Initializer,
}

impl EmbeddingConfig {
    /// Initialize a new [`Embedding`] with no adapters.
    pub fn init(&self, device: &Device) -> Embedding {
        let inner = burn::nn::EmbeddingConfig::new(self.n_embedding, self.d_model)
            .with_initializer(self.initializer.clone())
            .init(device);
        Embedding::from(inner)
    }
}

/// A lookup table (`weight` is `[n_embedding, d_model]`) that can carry named adapters.
/// Parameter name and forward are those of `burn::nn::Embedding`.
#[derive(Module, Debug)]
pub struct Embedding {
    /// The table, `[n_embedding, d_model]`.
    pub weight: Param<Tensor<2>>,
    /// Named adapters attached to this table.
    pub adapters: Vec<AdapterState>,
    /// Trainable copies for `modules_to_save`.
    pub copies: Vec<ModuleCopy>,
    /// A quantized frozen table ([`Embedding::quantized`]), one row per token: lookups
    /// dequantize the rows they read and `weight` is an empty stand-in.
    #[module(skip)]
    pub quantized: Option<QuantizedBase>,
}

impl From<burn::nn::Embedding> for Embedding {
    fn from(value: burn::nn::Embedding) -> Self {
        Self {
            weight: value.weight,
            adapters: Vec::new(),
            copies: Vec::new(),
            quantized: None,
        }
    }
}

impl Embedding {
    /// A table from a weight `[n_embedding, d_model]`.
    pub fn from_tensor(weight: Tensor<2>) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            adapters: Vec::new(),
            copies: Vec::new(),
            quantized: None,
        }
    }

    /// A table that stays quantized (a GGUF base): `table`'s rows are the tokens' vectors
    /// (`dims()` `[d_model, n_embedding]` in [`QuantizedWeight`](crate::nn::QuantizedWeight)'s
    /// terms).
    pub fn quantized(table: QuantizedBase, device: &Device) -> Self {
        let [d_model, _] = table.dims();
        Self {
            weight: Param::from_tensor(placeholder(d_model, device)),
            adapters: Vec::new(),
            copies: Vec::new(),
            quantized: Some(table),
        }
    }

    /// Number of rows and row size.
    pub fn dims(&self) -> [usize; 2] {
        match &self.quantized {
            Some(q) => {
                let [d_model, n_embedding] = q.dims();
                [n_embedding, d_model]
            }
            // Without initializing a lazy table (a model built to be loaded).
            None => self.weight.lazy_shape().dims::<2>(),
        }
    }

    /// Make the frozen table quantized (`table`'s rows are the tokens' vectors): the dense
    /// table is dropped for an empty stand-in. The caller checks the shape.
    pub fn set_quantized_base(&mut self, table: QuantizedBase, device: &Device) {
        let [d_model, _] = table.dims();
        self.weight = Param::initialized(self.weight.id, placeholder(d_model, device));
        self.quantized = Some(table);
    }

    /// Make a quantized table dense again (f32), as a merged or saved model needs; `false`
    /// when it was dense already.
    pub fn dequantize_base(&mut self) -> bool {
        let Some(q) = self.quantized.take() else {
            return false;
        };
        let dense = q.dequantize(&self.weight.lazy_device());
        self.weight = Param::initialized(self.weight.id, dense);
        true
    }

    /// The table `[n_embedding, d_model]` as kernels read it: the dense one, or the quantized
    /// one dequantized when `needed` (else the empty stand-in, which such kernels never read).
    pub(crate) fn base_table(&self, needed: bool) -> Tensor<2> {
        match &self.quantized {
            Some(q) if needed => q.dequantize(&self.weight.lazy_device()),
            _ => self.weight.val(),
        }
    }

    /// The rows of the layer's own table for `ids` `[batch, seq]`.
    pub(crate) fn base_lookup(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        match &self.quantized {
            Some(q) => {
                let [b, s] = ids.dims();
                let d = q.dims()[0];
                q.rows(ids.reshape([b * s])).reshape([b, s, d])
            }
            None => base_embedding(self.weight.val(), ids),
        }
    }

    /// `h · Eᵀ` (logits through a head tied to this table) for `h` `[n, d_model]`:
    /// `[n, n_embedding]`, through the quantized kernel when the table is quantized.
    pub fn tied_logits(&self, h: Tensor<2>) -> Tensor<2> {
        match &self.quantized {
            Some(q) => q.matmul(h),
            None => {
                let w = self.weight.val().transpose();
                if peft_ops::few_rows(&h, &w) {
                    // Decoding: a few rows against the whole table, read in bands.
                    return peft_ops::few_rows_matmul(h, w);
                }
                // A half-precision frozen table (mixed precision): multiply in its precision
                // and hand on the activations' precision.
                let dtype = h.dtype();
                h.cast(w.dtype()).matmul(w).cast(dtype)
            }
        }
    }

    /// Looks up `input` (`[batch, seq]`) and applies every active, unmerged adapter.
    ///
    /// # Panics
    /// In debug builds, if the table holds adapters (or `modules_to_save` copies) while a
    /// mixed-adapter batch is in flight on this thread: the model must call
    /// [`forward_in`](Self::forward_in) with the batch's context (see
    /// [`Linear::forward`](crate::nn::Linear::forward)).
    pub fn forward(&self, input: Tensor<2, Int>) -> Tensor<3> {
        super::guard::refuse_plain_forward("Embedding", || {
            !self.adapters.is_empty() || !self.copies.is_empty()
        });
        self.forward_active(input)
    }

    /// [`forward`](Self::forward) with a per-call context: in a mixed batch each row applies
    /// the adapter the context names for it (see [`Linear::forward_in`](crate::nn::Linear::forward_in)).
    pub fn forward_in(&self, input: Tensor<2, Int>, ctx: &ForwardContext) -> Tensor<3> {
        super::guard::enter(ctx);
        match ctx.rows() {
            Some(rows) => self.forward_mixed(input, rows),
            None => self.forward_active(input),
        }
    }

    fn forward_active(&self, input: Tensor<2, Int>) -> Tensor<3> {
        let copy = self.copies.iter().find(|c| c.active);
        let live = || self.adapters.iter().filter(|a| a.active && !a.merged);
        let lookup = |ids: Tensor<2, Int>| match copy {
            Some(copy) => base_embedding(copy.weight.val(), ids),
            None => self.base_lookup(ids),
        };
        if live().next().is_none() {
            return lookup(input);
        }
        let weight = match copy {
            Some(copy) => copy.weight.val(),
            None => self.base_table(live().any(|a| a.kernel.reads_base_weight())),
        };
        let base = BaseWeights { weight, bias: None };
        let mut y = lookup(input.clone());
        for adapter in live() {
            y = adapter
                .kernel
                .forward_embedding(adapter, &base, input.clone(), y);
        }
        y
    }
}

/// The rows of `weight` for `ids`, in f32: a half-precision frozen table
/// (`precision::cast_frozen_base`) hands on f32 activations.
pub(crate) fn base_embedding(weight: Tensor<2>, ids: Tensor<2, Int>) -> Tensor<3> {
    embedding(weight, ids).cast(DType::F32)
}
