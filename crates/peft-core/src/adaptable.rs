//! [`Adaptable`]: how a composite module lists its sites under their Hugging Face paths.

use std::fmt;

use crate::nn::{Conv1d, Conv2d, Embedding, KvPrefix, Linear};

/// A dotted module path (`encoder.layer.0.attention.self.query`), built segment by segment while
/// walking a model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SitePath(Vec<String>);

impl SitePath {
    /// The empty (root) path.
    pub fn root() -> Self {
        Self::default()
    }

    /// Enter a child named `segment`.
    pub fn push(&mut self, segment: impl Into<String>) {
        self.0.push(segment.into());
    }

    /// Leave the current child.
    pub fn pop(&mut self) {
        self.0.pop();
    }

    /// The segments.
    pub fn segments(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for SitePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// A borrowed site.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum Site<'a> {
    /// A linear projection.
    Linear(&'a Linear),
    /// An embedding table.
    Embedding(&'a Embedding),
    /// A 1-D convolution.
    Conv1d(&'a Conv1d),
    /// A 2-D convolution.
    Conv2d(&'a Conv2d),
    /// The attention key/value stream (prefix tuning).
    KvPrefix(&'a KvPrefix),
}

/// A mutably borrowed site.
#[derive(Debug)]
#[non_exhaustive]
pub enum SiteMut<'a> {
    /// A linear projection.
    Linear(&'a mut Linear),
    /// An embedding table.
    Embedding(&'a mut Embedding),
    /// A 1-D convolution.
    Conv1d(&'a mut Conv1d),
    /// A 2-D convolution.
    Conv2d(&'a mut Conv2d),
    /// The attention key/value stream (prefix tuning).
    KvPrefix(&'a mut KvPrefix),
}

/// A module whose adapter sites can be listed with their Hugging Face paths, like PyTorch's
/// `named_modules()` restricted to the layers an adapter can attach to.
///
/// Derive it with `#[derive(Adaptable)]` (field names are path segments; `Vec` adds index
/// segments; `Option` adds nothing when `None`; `#[peft(rename = "self")]` renames a segment;
/// `#[peft(skip)]` and `#[module(skip)]` fields are ignored). Burn's own parameter-only layers
/// (norms, dropout, activations) and primitive fields implement it with no sites.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not implement `Adaptable`",
    note = "derive it with `#[derive(Adaptable)]`, or mark the field `#[peft(skip)]` if it holds no adapter site"
)]
pub trait Adaptable {
    /// Call `visitor` for every site under `path`.
    fn visit_sites(&self, path: &mut SitePath, visitor: &mut dyn FnMut(&SitePath, Site<'_>));

    /// Call `visitor` for every site under `path`, mutably.
    fn visit_sites_mut(
        &mut self,
        path: &mut SitePath,
        visitor: &mut dyn FnMut(&SitePath, SiteMut<'_>),
    );

    /// The path of the model's output embeddings (`lm_head`), which `"all-linear"` always
    /// leaves out (PEFT: `model.get_output_embeddings()`).
    fn output_layer(&self) -> Option<String> {
        None
    }

    /// The path of the model's classification head (`classifier`, `score`), which
    /// `"all-linear"` leaves out when the method's `task_type` is `SEQ_CLS` (PEFT:
    /// `SEQ_CLS_HEAD_NAMES` in `_maybe_include_all_linear_layers`).
    fn classifier_head(&self) -> Option<String> {
        None
    }

    /// PEFT's default `target_modules` for this model under PEFT's mapping `table` (`"LORA"`,
    /// `"IA3"`: the `TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING` tables of
    /// `peft/utils/constants.py`, keyed there by `model_type`), which a method config that names
    /// no targets takes, as PEFT's `_prepare_adapter_config` does. `None` when the model has no
    /// entry in that table (then PEFT, and we, ask for `target_modules`).
    fn default_targets(&self, table: &str) -> Option<DefaultTargets> {
        let _ = table;
        None
    }
}

/// The modules PEFT adapts by default on a model type (see
/// [`Adaptable::default_targets`]).
///
/// ```
/// use peft_core::DefaultTargets;
/// let lora = DefaultTargets::new(&["q_proj", "v_proj"], &[]);
/// assert_eq!(lora.target_modules, ["q_proj", "v_proj"]);
/// assert!(lora.feedforward_modules.is_empty());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DefaultTargets {
    /// Modules to adapt (`target_modules`).
    pub target_modules: Vec<String>,
    /// Those of them that scale their input (IA3's `feedforward_modules`); empty for other
    /// tables.
    pub feedforward_modules: Vec<String>,
}

impl DefaultTargets {
    /// From string lists.
    pub fn new(target_modules: &[&str], feedforward_modules: &[&str]) -> Self {
        let own = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        Self {
            target_modules: own(target_modules),
            feedforward_modules: own(feedforward_modules),
        }
    }
}

impl Adaptable for Linear {
    fn visit_sites(&self, path: &mut SitePath, visitor: &mut dyn FnMut(&SitePath, Site<'_>)) {
        visitor(path, Site::Linear(self));
    }
    fn visit_sites_mut(
        &mut self,
        path: &mut SitePath,
        visitor: &mut dyn FnMut(&SitePath, SiteMut<'_>),
    ) {
        visitor(path, SiteMut::Linear(self));
    }
}

impl Adaptable for Embedding {
    fn visit_sites(&self, path: &mut SitePath, visitor: &mut dyn FnMut(&SitePath, Site<'_>)) {
        visitor(path, Site::Embedding(self));
    }
    fn visit_sites_mut(
        &mut self,
        path: &mut SitePath,
        visitor: &mut dyn FnMut(&SitePath, SiteMut<'_>),
    ) {
        visitor(path, SiteMut::Embedding(self));
    }
}

impl Adaptable for Conv1d {
    fn visit_sites(&self, path: &mut SitePath, visitor: &mut dyn FnMut(&SitePath, Site<'_>)) {
        visitor(path, Site::Conv1d(self));
    }
    fn visit_sites_mut(
        &mut self,
        path: &mut SitePath,
        visitor: &mut dyn FnMut(&SitePath, SiteMut<'_>),
    ) {
        visitor(path, SiteMut::Conv1d(self));
    }
}

impl Adaptable for Conv2d {
    fn visit_sites(&self, path: &mut SitePath, visitor: &mut dyn FnMut(&SitePath, Site<'_>)) {
        visitor(path, Site::Conv2d(self));
    }
    fn visit_sites_mut(
        &mut self,
        path: &mut SitePath,
        visitor: &mut dyn FnMut(&SitePath, SiteMut<'_>),
    ) {
        visitor(path, SiteMut::Conv2d(self));
    }
}

impl Adaptable for KvPrefix {
    fn visit_sites(&self, path: &mut SitePath, visitor: &mut dyn FnMut(&SitePath, Site<'_>)) {
        visitor(path, Site::KvPrefix(self));
    }
    fn visit_sites_mut(
        &mut self,
        path: &mut SitePath,
        visitor: &mut dyn FnMut(&SitePath, SiteMut<'_>),
    ) {
        visitor(path, SiteMut::KvPrefix(self));
    }
}

impl<T: Adaptable> Adaptable for Vec<T> {
    fn visit_sites(&self, path: &mut SitePath, visitor: &mut dyn FnMut(&SitePath, Site<'_>)) {
        for (i, item) in self.iter().enumerate() {
            path.push(i.to_string());
            item.visit_sites(path, visitor);
            path.pop();
        }
    }
    fn visit_sites_mut(
        &mut self,
        path: &mut SitePath,
        visitor: &mut dyn FnMut(&SitePath, SiteMut<'_>),
    ) {
        for (i, item) in self.iter_mut().enumerate() {
            path.push(i.to_string());
            item.visit_sites_mut(path, visitor);
            path.pop();
        }
    }
}

impl<T: Adaptable> Adaptable for Option<T> {
    fn visit_sites(&self, path: &mut SitePath, visitor: &mut dyn FnMut(&SitePath, Site<'_>)) {
        if let Some(item) = self {
            item.visit_sites(path, visitor);
        }
    }
    fn visit_sites_mut(
        &mut self,
        path: &mut SitePath,
        visitor: &mut dyn FnMut(&SitePath, SiteMut<'_>),
    ) {
        if let Some(item) = self {
            item.visit_sites_mut(path, visitor);
        }
    }
}

/// Implements [`Adaptable`] with no sites for types that hold none.
#[macro_export]
macro_rules! no_sites {
    ($($ty:ty),* $(,)?) => {
        $(
            impl $crate::Adaptable for $ty {
                fn visit_sites(
                    &self,
                    _path: &mut $crate::SitePath,
                    _visitor: &mut dyn FnMut(&$crate::SitePath, $crate::Site<'_>),
                ) {
                }
                fn visit_sites_mut(
                    &mut self,
                    _path: &mut $crate::SitePath,
                    _visitor: &mut dyn FnMut(&$crate::SitePath, $crate::SiteMut<'_>),
                ) {
                }
            }
        )*
    };
}

no_sites!(
    bool,
    u8,
    u16,
    u32,
    u64,
    usize,
    i8,
    i16,
    i32,
    i64,
    isize,
    f32,
    f64,
    String,
    burn::nn::LayerNorm,
    burn::nn::RmsNorm,
    burn::nn::Dropout,
    burn::nn::Gelu,
    burn::nn::Relu,
    burn::nn::Tanh,
    burn::nn::Sigmoid,
    burn::nn::SwiGlu,
    burn::nn::BatchNorm,
    burn::nn::GroupNorm,
    burn::nn::PRelu,
    burn::nn::LeakyRelu,
    burn::nn::Linear,
    burn::nn::Embedding,
);

impl<const D: usize> Adaptable for burn::module::Param<burn::tensor::Tensor<D>> {
    fn visit_sites(&self, _path: &mut SitePath, _visitor: &mut dyn FnMut(&SitePath, Site<'_>)) {}
    fn visit_sites_mut(
        &mut self,
        _path: &mut SitePath,
        _visitor: &mut dyn FnMut(&SitePath, SiteMut<'_>),
    ) {
    }
}

/// Every site of `model` as `(path, site)` pairs, in visiting order.
pub fn list_sites<M: Adaptable + ?Sized>(model: &M) -> Vec<(String, SiteSummary)> {
    let mut out = Vec::new();
    model.visit_sites(&mut SitePath::root(), &mut |path, site| {
        out.push((path.to_string(), SiteSummary::of(site)));
    });
    out
}

/// Shape and kind of a site, detached from the borrow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SiteSummary {
    /// A linear `[d_input] -> [d_output]`.
    Linear {
        /// Input size.
        d_input: usize,
        /// Output size.
        d_output: usize,
        /// Whether it has a bias.
        bias: bool,
    },
    /// An embedding `[n_embedding, d_model]`.
    Embedding {
        /// Rows.
        n_embedding: usize,
        /// Row size.
        d_model: usize,
    },
    /// A 1-D convolution `[in] -> [out]` with a `kernel_size` kernel.
    Conv1d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel size.
        kernel_size: usize,
        /// Channel groups.
        groups: usize,
    },
    /// A 2-D convolution `[in] -> [out]` with a `kernel_size` kernel.
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel height and width.
        kernel_size: [usize; 2],
        /// Channel groups.
        groups: usize,
    },
    /// An attention key/value prefix slot over `num_layers` layers.
    KvPrefix {
        /// Layers.
        num_layers: usize,
    },
}

impl SiteSummary {
    fn of(site: Site<'_>) -> Self {
        match site {
            Site::Linear(l) => {
                let [d_input, d_output] = l.dims();
                SiteSummary::Linear {
                    d_input,
                    d_output,
                    bias: l.bias.is_some(),
                }
            }
            Site::Embedding(e) => {
                let [n_embedding, d_model] = e.dims();
                SiteSummary::Embedding {
                    n_embedding,
                    d_model,
                }
            }
            Site::Conv1d(c) => {
                let [out_channels, _, kernel_size] = c.dims();
                SiteSummary::Conv1d {
                    in_channels: c.in_channels(),
                    out_channels,
                    kernel_size,
                    groups: c.groups,
                }
            }
            Site::Conv2d(c) => {
                let [out_channels, _, kh, kw] = c.dims();
                SiteSummary::Conv2d {
                    in_channels: c.in_channels(),
                    out_channels,
                    kernel_size: [kh, kw],
                    groups: c.geometry.groups,
                }
            }
            Site::KvPrefix(p) => SiteSummary::KvPrefix {
                num_layers: p.num_layers,
            },
        }
    }
}
