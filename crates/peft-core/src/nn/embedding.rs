use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::module::embedding;
use burn::tensor::{DType, Device, Int, Tensor};

use crate::adapter::{AdapterState, BaseWeights};
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
}

impl From<burn::nn::Embedding> for Embedding {
    fn from(value: burn::nn::Embedding) -> Self {
        Self {
            weight: value.weight,
            adapters: Vec::new(),
            copies: Vec::new(),
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
        }
    }

    /// Number of rows and row size.
    pub fn dims(&self) -> [usize; 2] {
        self.weight.dims()
    }

    /// Looks up `input` (`[batch, seq]`) and applies every active, unmerged adapter.
    pub fn forward(&self, input: Tensor<2, Int>) -> Tensor<3> {
        self.forward_active(input)
    }

    /// [`forward`](Self::forward) with a per-call context: in a mixed batch each row applies
    /// the adapter the context names for it (see [`Linear::forward_in`](crate::nn::Linear::forward_in)).
    pub fn forward_in(&self, input: Tensor<2, Int>, ctx: &ForwardContext) -> Tensor<3> {
        match ctx.rows() {
            Some(rows) => self.forward_mixed(input, rows),
            None => self.forward_active(input),
        }
    }

    fn forward_active(&self, input: Tensor<2, Int>) -> Tensor<3> {
        let weight = match self.copies.iter().find(|c| c.active) {
            Some(copy) => copy.weight.val(),
            None => self.weight.val(),
        };
        let live = || self.adapters.iter().filter(|a| a.active && !a.merged);
        if live().next().is_none() {
            return base_embedding(weight, input);
        }
        let base = BaseWeights { weight, bias: None };
        let mut y = base_embedding(base.weight.clone(), input.clone());
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
