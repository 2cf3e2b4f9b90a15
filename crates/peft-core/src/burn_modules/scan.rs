//! What a plain Burn module holds, read through Burn's own traversal: every module path (the
//! names `ModuleVisitor::enter_module` gives) with its kind and its direct parameters.

use std::any::Any;
use std::collections::{HashMap, HashSet};

use burn::module::{Flag, ModuleVisitor, Param, ParamId};
use burn::tensor::{Bool, Int, Tensor};

use crate::method::SiteKind;
use crate::nn::WeightLayout;

/// The container type Burn reports when it enters a parameter's reparameterization.
const REPARAMETERIZATION: &str = "Reparameterization";

/// A float parameter directly held by a module.
#[derive(Debug, Clone)]
pub(crate) struct ParamEntry {
    /// The field name (`weight`, `bias`).
    pub name: String,
    /// The parameter's shape (without initializing a lazy parameter).
    pub dims: Vec<usize>,
}

/// One module of the tree.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModuleNode {
    /// The module path (`layers.0.attn.q_proj`); empty for the root.
    pub path: String,
    /// The type name Burn gives its fields' container (`Linear`, `LayerNorm`, `Vec`, ...);
    /// empty when the module has no field Burn traverses.
    pub kind: String,
    /// Float parameters held directly, in field order.
    pub params: Vec<ParamEntry>,
    /// Other entries held directly: sub-modules and non-float parameters.
    pub others: usize,
}

impl ModuleNode {
    fn param(&self, name: &str) -> Option<&ParamEntry> {
        self.params.iter().find(|p| p.name == name)
    }

    /// The site this module offers to the weight-space path: a `Linear` holding `weight`
    /// `[in, out]` and optionally `bias` `[out]` (`burn::nn::Linear`, either layout: Burn keeps
    /// `[in, out]` in memory), or an `Embedding` holding `weight` `[vocab, dim]`; nothing else.
    pub fn site_kind(&self) -> Option<SiteKind> {
        if let Some(conv) = self.conv_site() {
            return Some(conv);
        }
        let weight = self.param("weight").filter(|w| w.dims.len() == 2)?;
        let bias = self.param("bias");
        let expected_params = 1 + usize::from(bias.is_some());
        if self.others != 0 || self.params.len() != expected_params {
            return None;
        }
        let [d_input, d_output] = [weight.dims[0], weight.dims[1]];
        match self.kind.as_str() {
            "Linear" if bias.is_none_or(|b| b.dims == [d_output]) => Some(SiteKind::Linear {
                d_input,
                d_output,
                bias: bias.is_some(),
                layout: WeightLayout::Linear,
            }),
            "Embedding" if bias.is_none() => Some(SiteKind::Embedding {
                n_embedding: d_input,
                d_model: d_output,
            }),
            _ => None,
        }
    }

    /// A `Conv2d` holding `weight` `[out, in / groups, kh, kw]` and optionally `bias` `[out]`
    /// (`burn::nn::conv::Conv2d`). Burn's traversal shows parameters only, not the stride,
    /// padding or groups: the weight-space form needs none of them, and a convolution is
    /// adapted as its kernel (`groups = 1` as far as the adapter knows: the update is a
    /// low-rank change of the kernel seen as `[out, in/g·kh·kw]`, which for a grouped
    /// convolution is not PEFT's grouped LoRA; see docs/plain-burn-modules.md).
    fn conv_site(&self) -> Option<SiteKind> {
        if self.kind != "Conv2d" || self.others != 0 {
            return None;
        }
        let weight = self.param("weight").filter(|w| w.dims.len() == 4)?;
        let bias = self.param("bias");
        let [out, per_group, kh, kw] = [
            weight.dims[0],
            weight.dims[1],
            weight.dims[2],
            weight.dims[3],
        ];
        if self.params.len() != 1 + usize::from(bias.is_some())
            || bias.is_some_and(|b| b.dims != [out])
        {
            return None;
        }
        Some(SiteKind::Conv2d {
            in_channels: per_group,
            out_channels: out,
            kernel_size: [kh, kw],
            geometry: crate::nn::ConvGeometry {
                stride: [1, 1],
                padding: [0, 0],
                dilation: [1, 1],
                groups: 1,
            },
            bias: bias.is_some(),
        })
    }

    /// The kind for messages: `Linear`, `LayerNorm`, `module without parameters`.
    pub fn kind_name(&self) -> String {
        if self.kind.is_empty() {
            "module without parameters".into()
        } else {
            self.kind.clone()
        }
    }
}

/// The module tree of a Burn module, in traversal order.
#[derive(Debug, Default)]
pub(crate) struct ModuleTree {
    /// Every module, the root first.
    pub modules: Vec<ModuleNode>,
    /// Parameters that carry a reparameterization: their path and the reparameterization's name
    /// (`peft` for ours, `lora` for Burn's `Module::apply_lora`).
    pub reparameterized: Vec<(String, String)>,
}

impl ModuleTree {
    /// Read the tree of `module`.
    pub fn of<M: burn::module::Module>(module: &M) -> Self {
        let mut scan = Scan::default();
        scan.tree.modules.push(ModuleNode::default());
        scan.index.insert(String::new(), 0);
        module.visit(&mut scan);
        let params = scan.params;
        let tree = &mut scan.tree;
        tree.modules.retain(|m| !params.contains(&m.path));
        // An entry with nothing under it is an `Option` holding `None` (Burn enters the field
        // either way), an empty `Vec` or a module without parameters: not part of its parent.
        let empty: Vec<String> = tree
            .modules
            .iter()
            .filter(|m| !m.path.is_empty() && m.params.is_empty() && m.others == 0)
            .map(|m| m.path.clone())
            .collect();
        for path in &empty {
            let parent = path.rsplit_once('.').map_or("", |(p, _)| p);
            if let Some(node) = tree.modules.iter_mut().find(|m| m.path == parent) {
                node.others -= 1;
            }
        }
        tree.modules.retain(|m| !empty.contains(&m.path));
        scan.tree
    }

    /// The module at `path`.
    pub fn get(&self, path: &str) -> Option<&ModuleNode> {
        self.modules.iter().find(|m| m.path == path)
    }

    /// The paths PEFT's matching sees (`named_modules()` keys): every module but the root.
    pub fn paths(&self) -> Vec<String> {
        self.modules
            .iter()
            .filter(|m| !m.path.is_empty())
            .map(|m| m.path.clone())
            .collect()
    }

    /// The paths of the linear layers, in order.
    pub fn linear_paths(&self) -> Vec<String> {
        self.modules
            .iter()
            .filter(|m| !m.path.is_empty())
            .filter(|m| matches!(m.site_kind(), Some(SiteKind::Linear { .. })))
            .map(|m| m.path.clone())
            .collect()
    }
}

#[derive(Default)]
struct Scan {
    /// The names entered so far, with the container type of each.
    stack: Vec<(String, String)>,
    /// Depth of the reparameterization being traversed (its contents are ours, not the model's).
    inside_reparameterization: Option<usize>,
    /// Entries entered that turned out to be parameters, by path.
    params: HashSet<String>,
    index: HashMap<String, usize>,
    tree: ModuleTree,
}

impl Scan {
    fn path(&self, depth: usize) -> String {
        self.stack[..depth]
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(".")
    }

    fn node(&mut self, path: String) -> &mut ModuleNode {
        let next = self.tree.modules.len();
        let index = *self.index.entry(path.clone()).or_insert(next);
        if index == next {
            self.tree.modules.push(ModuleNode {
                path,
                ..Default::default()
            });
        }
        &mut self.tree.modules[index]
    }

    /// The entry just entered is a parameter: no module; its parent holds it.
    fn parameter(&mut self, dims: Option<Vec<usize>>) {
        if self.inside_reparameterization.is_some() || self.stack.is_empty() {
            return;
        }
        let depth = self.stack.len();
        self.params.insert(self.path(depth));
        if let Some(dims) = dims {
            let name = self.stack[depth - 1].0.clone();
            let parent = self.node(self.path(depth - 1));
            parent.others -= 1;
            parent.params.push(ParamEntry { name, dims });
        }
    }
}

impl ModuleVisitor for Scan {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack
            .push((name.to_string(), container_type.to_string()));
        if self.inside_reparameterization.is_some() {
            return;
        }
        if container_type == REPARAMETERIZATION {
            let parameter = self.path(self.stack.len() - 1);
            self.tree
                .reparameterized
                .push((parameter, name.to_string()));
            self.inside_reparameterization = Some(self.stack.len());
            return;
        }
        let depth = self.stack.len();
        let kind = container_type
            .strip_prefix("Struct:")
            .or_else(|| container_type.strip_prefix("Enum:"))
            .unwrap_or(container_type)
            .to_string();
        let parent = self.node(self.path(depth - 1));
        parent.kind = kind;
        parent.others += 1;
        let path = self.path(depth);
        self.node(path);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        if self.inside_reparameterization == Some(self.stack.len()) {
            self.inside_reparameterization = None;
        }
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.parameter(Some(param.lazy_shape().to_vec()));
    }

    fn visit_int<const D: usize>(&mut self, _param: &Param<Tensor<D, Int>>) {
        self.parameter(None);
    }

    fn visit_bool<const D: usize>(&mut self, _param: &Param<Tensor<D, Bool>>) {
        self.parameter(None);
    }

    fn visit_flag(&mut self, _param: &Param<Flag>) {
        self.parameter(None);
    }
}

/// Every float parameter inside our reparameterizations (the adapters' tensors), by id, as
/// `Param<Tensor<D>>` behind `Any`.
#[derive(Default)]
pub(crate) struct AdapterParams {
    stack: Vec<String>,
    depth: Option<usize>,
    /// The parameters found.
    pub found: HashMap<ParamId, Box<dyn Any>>,
}

impl AdapterParams {
    /// The adapter parameters of `module`.
    pub fn of<M: burn::module::Module>(module: &M) -> HashMap<ParamId, Box<dyn Any>> {
        let mut visitor = Self::default();
        module.visit(&mut visitor);
        visitor.found
    }
}

impl ModuleVisitor for AdapterParams {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack.push(name.to_string());
        if self.depth.is_none()
            && container_type == REPARAMETERIZATION
            && name == super::reparam::NAME
        {
            self.depth = Some(self.stack.len());
        }
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        if self.depth == Some(self.stack.len()) {
            self.depth = None;
        }
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.depth.is_some() {
            self.found.insert(param.id, Box::new(param.clone()));
        }
    }
}

/// The values of the float parameters at `paths` (base values: a reparameterized parameter is
/// read without its reparameterization).
pub(crate) struct ValuesAt<'a> {
    stack: Vec<String>,
    paths: &'a [String],
    /// `Tensor<D>` behind `Any`, by path.
    pub found: HashMap<String, Box<dyn Any>>,
}

impl<'a> ValuesAt<'a> {
    /// The values at `paths` in `module`.
    pub fn of<M: burn::module::Module>(
        module: &M,
        paths: &'a [String],
    ) -> HashMap<String, Box<dyn Any>> {
        let mut visitor = Self {
            stack: Vec::new(),
            paths,
            found: HashMap::new(),
        };
        module.visit(&mut visitor);
        visitor.found
    }
}

impl ModuleVisitor for ValuesAt<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.stack.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.stack.join(".");
        if self.paths.contains(&path) {
            self.found.insert(path, Box::new(param.val()));
        }
    }
}

/// The ids of every float parameter of `module`, the adapters' inside our reparameterizations
/// included.
pub(crate) fn param_ids<M: burn::module::Module>(module: &M) -> HashSet<ParamId> {
    struct Ids(HashSet<ParamId>);
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.insert(param.id);
        }
    }
    let mut ids = Ids(HashSet::new());
    module.visit(&mut ids);
    ids.0
}
