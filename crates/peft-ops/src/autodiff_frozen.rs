//! The backward of the ops over frozen matrices (peft-ops' block formats, and dense weights
//! read in place by `few_rows`): nothing of the matrix is trained, so each gives the input
//! gradient only.

use std::sync::Arc;

use burn::backend::Flex;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::FloatTensorOps;

use super::Tracked;
use crate::backend::PeftOps;
use crate::kernels::elementwise;
use crate::kernels::tensor::{contiguous, dims, from_vec, slice};
use crate::quant::{QuantMatrix, flex_product};

/// The backward of a product with a frozen quantized matrix: the other product (`x · Wᵀ` and
/// `dy · W` are each other's input gradient).
#[derive(Debug)]
pub(super) struct QuantGrad;

impl Backward<Flex, 1> for QuantGrad {
    type State = (Arc<QuantMatrix>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (w, transposed) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            flex_product(g, &w, !transposed)
        });
    }
}

pub(super) fn quant_op<C: CheckpointStrategy>(
    x: Tracked<C>,
    w: Arc<QuantMatrix>,
    transposed: bool,
) -> Tracked<C> {
    let (x, guard) = x.into_parts();
    // The state is only the shared matrix: nothing of the input is kept.
    let out = flex_product(x, &w, transposed);
    match QuantGrad.prepare::<C>([guard]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((w, transposed), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// The backward of SwiGLU over two frozen quantized projections of `x`: the gate and up
/// products are recomputed from `x` (two quantized GEMMs) instead of kept from the forward.
/// For a QLoRA step that is most of a gated MLP's activation memory: `x` is `[n, hidden]`,
/// the products `2 x [n, intermediate]` (SmolLM2: 576 against 2 x 1,536 values per token).
#[derive(Debug)]
pub(super) struct QuantSwigluGrad;

impl Backward<Flex, 1> for QuantSwigluGrad {
    type State = (FlexTensor, Arc<QuantMatrix>, Arc<QuantMatrix>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, gate, up) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            let g = contiguous(g);
            let a = flex_product(x.clone(), &gate, false);
            let b = flex_product(x.clone(), &up, false);
            let (da, db) = elementwise::swiglu_backward(&a, &b, &g);
            let dx_gate = flex_product(da, &gate, true);
            let dx_up = flex_product(db, &up, true);
            let mut dx = slice(&dx_gate).to_vec();
            for (d, u) in dx.iter_mut().zip(slice(&dx_up)) {
                *d += u;
            }
            from_vec(dx, &dims(&dx_gate))
        });
    }
}

pub(super) fn quant_swiglu<C: CheckpointStrategy>(
    x: Tracked<C>,
    gate: Arc<QuantMatrix>,
    up: Arc<QuantMatrix>,
) -> Tracked<C> {
    let (x, guard) = x.into_parts();
    let x = contiguous(x);
    let out = <Flex as PeftOps>::fused_quant_swiglu(x.clone(), gate.clone(), up.clone());
    match QuantSwigluGrad
        .prepare::<C>([guard])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((x, gate, up), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

/// The backward of `x · w` for a dense `w` that takes no gradient (a frozen base weight):
/// `dx = dy · wᵀ`, the product Burn's own matmul backward runs.
#[derive(Debug)]
pub(super) struct FrozenGrad;

impl Backward<Flex, 1> for FrozenGrad {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            <Flex as FloatTensorOps<Flex>>::float_matmul(
                g,
                <Flex as FloatTensorOps<Flex>>::float_transpose(w),
            )
        });
    }
}

/// `x · w` through the few-rows kernels (`crate::few_rows`: `w` is never tracked), recording
/// the input gradient when `x` is tracked (a LoRA step's frozen base products).
pub(super) fn frozen_op<C: CheckpointStrategy>(x: Tracked<C>, w: FlexTensor) -> Tracked<C> {
    let (x, guard) = x.into_parts();
    // The state is the weight alone, a shared buffer the model holds anyway.
    let out = <Flex as PeftOps>::fused_few_rows_matmul(x, w.clone());
    match FrozenGrad.prepare::<C>([guard]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(w, out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}
