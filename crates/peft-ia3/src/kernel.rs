//! IA3's behaviour at a linear site: scale the output (or, for feedforward layers, the input),
//! fold the scale into the weight, and PEFT's bundle layout.

use burn::tensor::{Tensor, TensorData};
use peft_core::{
    AdapterKernel, AdapterState, BaseWeights, MergeDirection, MergeInput, Result, TensorSource,
};

/// Bundle name of the scaling vector, relative to the site.
pub const IA3_KEY: &str = "ia3_l";

/// PEFT adds this to `l` before dividing in `unmerge` ("to avoid division by zero",
/// `peft/tuners/ia3/layer.py`), so unmerging is not exact; we do the same to match it.
const UNMERGE_EPS: f64 = 1e-8;

/// IA3 at one linear site; `vectors[0]` is `l`.
///
/// A feedforward site scales its input, `y = (x ⊙ l) W + b` with `l` of size `d_in`; any other
/// site scales its output, `y = (x W + b) ⊙ l` with `l` of size `d_out` (PEFT's `Linear.forward`
/// in `peft/tuners/ia3/layer.py`). In the bundle `l` is `[1, d_in]` or `[d_out, 1]`, whatever
/// the layer's file layout.
#[derive(Debug, Clone)]
pub struct Ia3Kernel {
    /// Whether the site is one of `feedforward_modules`.
    pub feedforward: bool,
}

impl Ia3Kernel {
    /// `l` as a row `[1, n]`.
    fn row(state: &AdapterState) -> Tensor<2> {
        state.vectors[0].val().unsqueeze::<2>()
    }

    /// The bundle shape of an `l` with `n` entries.
    fn file_shape(&self, n: usize) -> [usize; 2] {
        if self.feedforward { [1, n] } else { [n, 1] }
    }
}

impl AdapterKernel for Ia3Kernel {
    fn reads_base_weight(&self) -> bool {
        // The low-rank / scaling path never reads W: a quantized base stays quantized.
        false
    }

    fn transform_input(&self, state: &AdapterState, x: Tensor<2>) -> Tensor<2> {
        if self.feedforward {
            x * Self::row(state)
        } else {
            x
        }
    }

    fn transforms_input(&self, _state: &AdapterState) -> bool {
        self.feedforward
    }

    fn forward_linear(
        &self,
        state: &AdapterState,
        _base: &BaseWeights,
        _x: Tensor<2>,
        y: Tensor<2>,
    ) -> Tensor<2> {
        if self.feedforward {
            y
        } else {
            y * Self::row(state)
        }
    }

    fn merge(
        &self,
        state: &mut AdapterState,
        site: MergeInput<'_>,
        direction: MergeDirection,
    ) -> Result<BaseWeights> {
        let l = state.vectors[0].val().detach();
        let l = match direction {
            MergeDirection::Merge => l,
            MergeDirection::Unmerge => l.add_scalar(UNMERGE_EPS),
        };
        let BaseWeights { weight, bias } = site.current;
        // Burn keeps W as [in, out]: input scaling scales the rows, output scaling the columns
        // (and the bias, which PEFT scales for non-feedforward layers only).
        let factor = if self.feedforward {
            l.clone().unsqueeze_dim::<2>(1)
        } else {
            l.clone().unsqueeze::<2>()
        };
        let scaled_bias = |b: Tensor<1>| match direction {
            MergeDirection::Merge => b * l.clone(),
            MergeDirection::Unmerge => b / l.clone(),
        };
        let weight = match direction {
            MergeDirection::Merge => weight * factor,
            MergeDirection::Unmerge => weight / factor,
        };
        let bias = if self.feedforward {
            bias
        } else {
            bias.map(scaled_bias)
        };
        Ok(BaseWeights { weight, bias })
    }

    fn export(&self, state: &AdapterState) -> Vec<(String, TensorData)> {
        let [n] = state.vectors[0].dims();
        let l = state.vectors[0].val().reshape(self.file_shape(n));
        vec![(IA3_KEY.into(), l.into_data())]
    }

    fn import(
        &self,
        mut state: AdapterState,
        source: &mut dyn TensorSource,
    ) -> Result<AdapterState> {
        let [n] = state.vectors[0].dims();
        let data = source.take(IA3_KEY, &self.file_shape(n))?;
        let values = data
            .try_to_vec::<f32>()
            .expect("bundle tensors are read as f32");
        state.set_vector(0, TensorData::new(values, [n]));
        Ok(state)
    }
}
