//! LoRA and DoRA on 2-D convolutions, as PEFT 0.21.2 defines them (`_ConvNd` in
//! `peft/tuners/lora/layer.py`, `_DoraConvNdLayer` in `peft/tuners/lora/dora.py`):
//!
//! - `lora_A` is a convolution with the base's kernel size, stride and padding, `r` output
//!   channels, no groups and no dilation (PEFT builds it from `kernel_size, stride, padding`
//!   alone); `lora_B` a 1x1 convolution with the base's groups. Output:
//!   `y + lora_B(lora_A(dropout(x))) · s`.
//! - Groups: the rank must be divisible by them; merging (and so the weight-space form) is
//!   refused, as PEFT refuses it.
//! - DoRA: the magnitude is one value per output channel (`[1, out, 1, 1]` in the file), the norm
//!   runs over everything else of the kernel.
//! - `nn.Conv1d` (PEFT's `lora.Conv1d`) is the same with one spatial dimension: the layer hands
//!   its adapters a 2-D convolution of height 1, and only the bundle shapes differ.
//!
//! In memory `A` is the matrix `[in·kh·kw, r]` and `B` `[r / groups, out]`, the layout of a
//! linear site, so for `groups = 1` the delta `A·B` is the kernel's change seen as the matrix
//! [`kernel_as_matrix`] gives, and merging, DoRA's norms and combinations are the linear ones.

use std::sync::Arc;

use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Distribution, Tensor, TensorData};
use peft_core::nn::{ConvBase, ConvGeometry, kernel_as_matrix};
use peft_core::{
    AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, PeftError, Result,
    SiteInfo, TensorSource, WeightSpace,
};

use crate::dora::{MAGNITUDE_KEY, dora_weight, initial_magnitude, magnitude_scale, merge_dora};
use crate::kernel::{LoraLinearKernel, delta, linear_weight_space, transposed};

/// The shape of a convolution site as its adapter needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Kernel height and width.
    pub kernel_size: [usize; 2],
    /// The base's stride, padding, dilation and groups.
    pub geometry: ConvGeometry,
    /// A 1-D convolution (`nn.Conv1d`), handled as 2-D of height 1: its bundle tensors have
    /// one spatial dimension (`lora_A` `[r, in, k]`).
    pub one_d: bool,
}

impl ConvShape {
    fn fan_in(&self) -> usize {
        self.in_channels * self.kernel_size[0] * self.kernel_size[1]
    }

    /// `lora_A` as PEFT builds it: the base's kernel size, stride and padding, dilation 1, one
    /// group.
    fn a_options(&self) -> ConvOptions<2> {
        ConvOptions::new(self.geometry.stride, self.geometry.padding, [1, 1], 1)
    }

    /// `lora_B`: 1x1, stride 1, the base's groups.
    fn b_options(&self) -> ConvOptions<2> {
        ConvOptions::new([1, 1], [0, 0], [1, 1], self.geometry.groups)
    }

    /// `lora_A` as computed: `[r, in, kh, kw]`.
    fn a_dims(&self, r: usize) -> [usize; 4] {
        [
            r,
            self.in_channels,
            self.kernel_size[0],
            self.kernel_size[1],
        ]
    }

    /// `lora_B` as computed: `[out, r / groups, 1, 1]`.
    fn b_dims(&self, r: usize) -> [usize; 4] {
        [self.out_channels, r / self.geometry.groups, 1, 1]
    }

    /// A computed 4-D shape as the bundle stores it (the height dropped for a 1-D convolution).
    fn file_shape(&self, dims: [usize; 4]) -> Vec<usize> {
        if self.one_d {
            vec![dims[0], dims[1], dims[3]]
        } else {
            dims.to_vec()
        }
    }

    /// DoRA's magnitude in the bundle: `[1, out, 1, 1]` (`[1, out, 1]` for 1-D).
    fn magnitude_shape(&self) -> Vec<usize> {
        self.file_shape([1, self.out_channels, 1, 1])
    }

    fn grouped(&self) -> bool {
        self.geometry.groups > 1
    }
}

/// Fresh LoRA tensors for a convolution: `A [in·kh·kw, r]`, `B [r / groups, out]`, initialized
/// as PEFT's `reset_lora_parameters` does for `nn.Conv2d` (Kaiming-uniform A over its fan-in
/// `in·kh·kw`, or Gaussian; zero B, or Kaiming-uniform B when `zero_b` is false).
pub(crate) fn fresh_tensors(
    shape: &ConvShape,
    r: usize,
    gaussian: bool,
    zero_b: bool,
    device: &burn::tensor::Device,
) -> (Tensor<2>, Tensor<2>) {
    let fan_in = shape.fan_in();
    let a = if gaussian {
        Tensor::<2>::random(
            [fan_in, r],
            Distribution::Normal(0.0, 1.0 / r as f64),
            device,
        )
    } else {
        let bound = 1.0 / (fan_in as f64).sqrt();
        Tensor::<2>::random([fan_in, r], Distribution::Uniform(-bound, bound), device)
    };
    let per_group = r / shape.geometry.groups;
    let b = if zero_b {
        Tensor::<2>::zeros([per_group, shape.out_channels], device)
    } else {
        let bound = 1.0 / (per_group as f64).sqrt();
        Tensor::<2>::random(
            [per_group, shape.out_channels],
            Distribution::Uniform(-bound, bound),
            device,
        )
    };
    (a, b)
}

/// The checks PEFT makes when a convolution is targeted (`_ConvNd.__init__`), and the ones we
/// add where PEFT would fail later.
pub(crate) fn check_site(site: &SiteInfo, shape: &ConvShape, r: usize, dora: bool) -> Result<()> {
    let refuse = |reason: String| {
        Err(PeftError::InvalidConfig {
            file: None,
            key: "target_modules".into(),
            reason: format!("`{}` ({}): {reason}", site.path, site.kind.name()),
        })
    };
    let groups = shape.geometry.groups;
    if !r.is_multiple_of(groups) {
        return refuse(format!(
            "rank {r} is not divisible by the layer's groups ({groups}); PEFT supports grouped \
             convolutions only then: choose a rank that is a multiple of {groups} \
             (`rank_pattern`) or do not target this layer"
        ));
    }
    if shape.geometry.dilation != [1, 1] {
        // PEFT's lora_A has no dilation: its output would not line up with the base's.
        return refuse(format!(
            "dilation {:?}: PEFT's lora_A is built without the base's dilation, so its output \
             does not match the layer's; do not target dilated convolutions",
            shape.geometry.dilation
        ));
    }
    if dora && shape.grouped() {
        return refuse(format!(
            "DoRA on a grouped convolution (groups = {groups}) has no merged form (PEFT cannot \
             merge grouped convolutions); use plain LoRA here, or leave the layer out"
        ));
    }
    Ok(())
}

/// `B(A(x))` without scaling: `[b, out, h', w']`.
fn low_rank(state: &AdapterState, shape: &ConvShape, x: Tensor<4>) -> Tensor<4> {
    let a = state.matrices[0].val();
    let b = state.matrices[1].val();
    let [_, r] = a.dims();
    let a4 = a.transpose().reshape(shape.a_dims(r));
    let b4 = b.transpose().reshape(shape.b_dims(r));
    let low = conv2d(x, a4, None, shape.a_options());
    conv2d(low, b4, None, shape.b_options())
}

fn refuse_grouped_merge(state: &AdapterState) -> PeftError {
    PeftError::NotSupportedByMethod {
        adapter: state.name.clone(),
        method: "LORA".into(),
        reason: "merging into a convolution with groups > 1 is not supported (PEFT refuses it \
                 too: `Merging is not supported for _ConvNd layers with groups > 1`); run the \
                 adapter unmerged"
            .into(),
    }
}

fn export_conv(state: &AdapterState, shape: &ConvShape) -> Vec<(String, TensorData)> {
    let a = state.matrices[0].val();
    let [_, r] = a.dims();
    let file = |t: Tensor<2>, dims: [usize; 4]| {
        let data = t.transpose().reshape(dims).into_data();
        let values = data.try_to_vec::<f32>().expect("adapter tensors are f32");
        TensorData::new(values, shape.file_shape(dims))
    };
    vec![
        ("lora_A.weight".into(), file(a, shape.a_dims(r))),
        (
            "lora_B.weight".into(),
            file(state.matrices[1].val(), shape.b_dims(r)),
        ),
    ]
}

/// A 4-D file tensor as the `[rows, cols]` matrix it flattens to, transposed to ours.
fn flattened_transposed(data: TensorData, rows: usize, cols: usize) -> TensorData {
    let values = data
        .try_to_vec::<f32>()
        .expect("bundle tensors are read as f32");
    transposed(TensorData::new(values, [rows, cols]))
}

fn import_conv(
    mut state: AdapterState,
    shape: &ConvShape,
    source: &mut dyn TensorSource,
) -> Result<AdapterState> {
    let [fan_in, r] = state.matrices[0].dims();
    let a = source.take("lora_A.weight", &shape.file_shape(shape.a_dims(r)))?;
    let b = source.take("lora_B.weight", &shape.file_shape(shape.b_dims(r)))?;
    let per_group = r / shape.geometry.groups;
    state.set_matrix(0, flattened_transposed(a, r, fan_in));
    state.set_matrix(1, flattened_transposed(b, shape.out_channels, per_group));
    Ok(state)
}

/// LoRA on a 2-D convolution (see the module documentation).
#[derive(Debug)]
pub struct LoraConv2dKernel {
    /// Scaling, dropout and rank, as at a linear site.
    pub lora: LoraLinearKernel,
    /// The site.
    pub shape: ConvShape,
}

impl AdapterKernel for LoraConv2dKernel {
    fn reads_base_weight(&self) -> bool {
        false
    }

    fn forward_conv2d(
        &self,
        state: &AdapterState,
        _base: &ConvBase,
        x: Tensor<4>,
        y: Tensor<4>,
    ) -> Tensor<4> {
        let p = if self.lora.dropout > 0.0 && state.is_training(&x) {
            self.lora.dropout
        } else {
            0.0
        };
        let x = peft_ops::dropout(x, p);
        y + low_rank(state, &self.shape, x).mul_scalar(self.lora.scaling)
    }

    fn merge(
        &self,
        state: &mut AdapterState,
        site: MergeInput<'_>,
        direction: MergeDirection,
    ) -> Result<BaseWeights> {
        if self.shape.grouped() {
            return Err(refuse_grouped_merge(state));
        }
        self.lora.merge(state, site, direction)
    }

    fn weight_space(&self) -> WeightSpace {
        if self.shape.grouped() {
            return WeightSpace::Unsupported(
                "a grouped convolution's LoRA has no weight form (PEFT cannot merge it)".into(),
            );
        }
        linear_weight_space(self.lora.dropout)
    }

    fn effective_weight(
        &self,
        state: &AdapterState,
        _base: &Tensor<2>,
        weight: Tensor<2>,
    ) -> Tensor<2> {
        weight + delta(state, self.lora.scaling)
    }

    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> {
        export_conv(state, &self.shape)
    }

    fn import(&self, state: AdapterState, source: &mut dyn TensorSource) -> Result<AdapterState> {
        import_conv(state, &self.shape, source)
    }
}

/// DoRA on a 2-D convolution (PEFT's `_DoraConvNdLayer`, groups = 1): the output is
/// `y + (scale - 1)·(conv(x, W)) + scale·B(A(x))·s` with `scale = m / ‖W + s·ΔW‖` per output
/// channel, the norm detached. The state is LoRA's plus `vectors = [m [out]]`.
#[derive(Debug)]
pub struct DoraConv2dKernel {
    /// The LoRA part.
    pub lora: LoraConv2dKernel,
}

impl DoraConv2dKernel {
    /// A fresh adapter state for `site` from LoRA's `a` and `b`, with the magnitude at the
    /// per-channel norms of `W + s·ΔW`.
    pub fn adapter(
        self,
        name: &str,
        site: &SiteInfo,
        a: Tensor<2>,
        b: Tensor<2>,
    ) -> Result<AdapterState> {
        let m = initial_magnitude(site, &a, &b, self.lora.lora.scaling)?;
        Ok(AdapterState::new(name, vec![a, b], vec![m], Arc::new(self)))
    }

    fn channel_scale(&self, state: &AdapterState, base: &ConvBase) -> Tensor<4> {
        let matrix = kernel_as_matrix(base.weight.clone());
        let scale = magnitude_scale(state, &matrix, self.lora.lora.scaling);
        let out = self.lora.shape.out_channels;
        scale.reshape([1, out, 1, 1])
    }
}

impl AdapterKernel for DoraConv2dKernel {
    fn forward_conv2d(
        &self,
        state: &AdapterState,
        base: &ConvBase,
        x: Tensor<4>,
        y: Tensor<4>,
    ) -> Tensor<4> {
        let scale = self.channel_scale(state, base);
        let lora = &self.lora.lora;
        // PEFT (`_DoraConvNdVariant.forward`): with dropout active the base convolution is
        // recomputed on the dropped input; otherwise it is the output so far minus the bias.
        let (x, base_result) = if lora.dropout > 0.0 && state.is_training(&x) {
            let x = peft_ops::dropout(x, lora.dropout);
            let base_result = base.conv_without_bias(x.clone());
            (x, base_result)
        } else {
            let base_result = match &base.bias {
                Some(bias) => {
                    let out = bias.dims()[0];
                    y.clone() - bias.clone().reshape([1, out, 1, 1])
                }
                None => y.clone(),
            };
            (x, base_result)
        };
        let lora_result = low_rank(state, &self.lora.shape, x).mul_scalar(lora.scaling);
        y + (scale.clone() - 1.0) * base_result + scale * lora_result
    }

    fn merge(
        &self,
        state: &mut AdapterState,
        site: MergeInput<'_>,
        direction: MergeDirection,
    ) -> Result<BaseWeights> {
        let layout_delta = delta(state, self.lora.lora.scaling);
        merge_dora(state, site, direction, layout_delta)
    }

    fn weight_space(&self) -> WeightSpace {
        linear_weight_space(self.lora.lora.dropout)
    }

    fn effective_weight(
        &self,
        state: &AdapterState,
        base: &Tensor<2>,
        weight: Tensor<2>,
    ) -> Tensor<2> {
        dora_weight(state, base, weight, self.lora.lora.scaling)
    }

    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> {
        let mut tensors = self.lora.export(state);
        let m = state.vectors[0]
            .val()
            .into_data()
            .try_to_vec::<f32>()
            .expect("adapter tensors are f32");
        tensors.push((
            MAGNITUDE_KEY.into(),
            TensorData::new(m, self.lora.shape.magnitude_shape()),
        ));
        tensors
    }

    fn import(&self, state: AdapterState, source: &mut dyn TensorSource) -> Result<AdapterState> {
        let mut state = self.lora.import(state, source)?;
        let out = self.lora.shape.out_channels;
        let data = source.take(MAGNITUDE_KEY, &self.lora.shape.magnitude_shape())?;
        let values = data
            .try_to_vec::<f32>()
            .expect("bundle tensors are read as f32");
        state.set_vector(0, TensorData::new(values, [out]));
        Ok(state)
    }
}
