//! What a training step reads back from the device: the loss and the gradient norm, in one
//! transfer per optimizer step.
//!
//! On a GPU every read is a synchronisation: the host waits for the queue to drain, and Burn's
//! fusion backend has to flush what it was batching. A read per micro-batch (the loss) plus one
//! per parameter (the gradient norm) made a LoRA step on a 16-layer model wait on the device
//! dozens of times; here the losses of the micro-batches and the squared gradient norms are
//! summed on the device and read together once, when the host needs them (clipping, the NaN
//! check, logging).

use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};

use crate::optim::global_grad_sq;

/// What an optimizer step needs from the device: `[loss, squared gradient norm]`, with `loss`
/// the step's summed micro-batch losses. On flex, where a read costs nothing, the gradient
/// norm is peft-ops' fused one-pass sum per tensor ([`global_grad_sq`]); on any other device
/// both are summed there and read in one transfer.
pub fn loss_and_grad_sq(
    device: &Device,
    loss: Option<Tensor<1>>,
    grads: &GradientsParams,
    params: &[(ParamId, String, usize)],
) -> [f64; 2] {
    if peft_ops::is_flex(device) {
        let [loss] = read_scalars([loss]);
        return [loss, global_grad_sq(grads, params)];
    }
    read_scalars([loss, grad_sq_sum(grads, params)])
}

/// Sum on the device of the squared gradients of `params` (`(id, path, rank)` as
/// `optim::trainable_paths` lists them); `None` when none of them has a gradient.
pub fn grad_sq_sum(
    grads: &GradientsParams,
    params: &[(ParamId, String, usize)],
) -> Option<Tensor<1>> {
    fn sq<const D: usize>(grads: &GradientsParams, id: ParamId) -> Option<Tensor<1>> {
        grads.get::<D>(id).map(|g| (g.clone() * g).sum())
    }
    params
        .iter()
        .filter_map(|(id, _, rank)| match rank {
            1 => sq::<1>(grads, *id),
            2 => sq::<2>(grads, *id),
            3 => sq::<3>(grads, *id),
            4 => sq::<4>(grads, *id),
            _ => None,
        })
        .reduce(|a, b| a + b)
}

/// Add `value` (a `[1]` loss) to the running sum `acc`, on the device.
pub fn accumulate(acc: Option<Tensor<1>>, value: Tensor<1>) -> Option<Tensor<1>> {
    Some(match acc {
        Some(a) => a + value,
        None => value,
    })
}

/// Read `[1]`-tensors (on one device) in a single transfer, as `f64`. Missing values read as 0.
pub fn read_scalars<const N: usize>(values: [Option<Tensor<1>>; N]) -> [f64; N] {
    let present: Vec<(usize, Tensor<1>)> = values
        .into_iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|t| (i, t.reshape([1]))))
        .collect();
    let mut out = [0.0; N];
    if present.is_empty() {
        return out;
    }
    let (slots, tensors): (Vec<usize>, Vec<Tensor<1>>) = present.into_iter().unzip();
    let data = Tensor::cat(tensors, 0).into_data().convert::<f64>();
    for (slot, v) in slots.into_iter().zip(data.iter::<f64>()) {
        out[slot] = v;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn reads_present_values_in_place() {
        let device = Device::flex();
        let t = |v: f32| Some(Tensor::<1>::from_floats([v], &device));
        assert_eq!(read_scalars([t(2.5), None, t(-1.0)]), [2.5, 0.0, -1.0]);
        assert_eq!(read_scalars::<2>([None, None]), [0.0, 0.0]);
        let sum = accumulate(accumulate(None, t(1.0).unwrap()), t(2.0).unwrap());
        assert_eq!(read_scalars([sum]), [3.0]);
    }
}
