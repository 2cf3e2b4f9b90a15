//! The ops under autodiff on flex: each is one tracked node whose hand-written backward runs
//! the flex kernels, instead of the dozen tracked intermediates of the composition.
//!
//! Each op keeps for its backward only what the backward reads (flex tensors are shared
//! buffers, so keeping an input costs nothing when it is alive anyway): GELU its input,
//! attention its inputs, output and log-sum-exp rows, the norms their (residual-summed) input
//! and per-row statistics, log-softmax its output, dropout and LoRA their key.

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Flex};

use crate::backend::{PeftOps, mask, norm_forward};
use crate::kernels::dropout::Mask;
use crate::kernels::elementwise::{self, Gelu};
use crate::kernels::norm::{self, Norm, Stats};
use crate::kernels::optim::AdamWStep;
use crate::kernels::tensor::{contiguous, dims, from_vec, slice};
use crate::kernels::{attention, lora, rope, softmax};
use crate::quant::QuantMatrix;

type Tracked<C> = FloatTensor<Autodiff<Flex, C>>;

#[path = "autodiff_frozen.rs"]
mod frozen;

#[derive(Debug)]
struct GeluGrad;

impl Backward<Flex, 1> for GeluGrad {
    type State = (FlexTensor, Gelu);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, kind) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            elementwise::backward(&x, g, kind)
        });
    }
}

fn gelu<C: CheckpointStrategy>(x: Tracked<C>, kind: Gelu) -> Tracked<C> {
    let (x, guard) = x.into_parts();
    match GeluGrad.prepare::<C>([guard]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let out = elementwise::forward(x.clone(), kind);
            prep.finish((x, kind), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(elementwise::forward(x, kind)),
    }
}

#[derive(Debug, Clone)]
struct AttentionState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    mask: Option<FlexTensor>,
    out: FlexTensor,
    lse: FlexTensor,
    causal: bool,
    scale: f32,
}

#[derive(Debug)]
struct AttentionGrad;

impl Backward<Flex, 3> for AttentionGrad {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        let grad = grads.consume::<Flex>(&ops.node);
        let [nq, nk, nv] = ops.parents;
        let needs = attention::Needs {
            q: nq.is_some(),
            k: nk.is_some(),
            v: nv.is_some(),
        };
        let (dq, dk, dv) = attention::backward(
            &s.q,
            &s.k,
            &s.v,
            s.mask.as_ref(),
            &s.out,
            &s.lse,
            grad,
            s.causal,
            s.scale,
            needs,
        );
        for (node, g) in [(nq, dq), (nk, dk), (nv, dv)] {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

fn sdpa<C: CheckpointStrategy>(
    q: Tracked<C>,
    k: Tracked<C>,
    v: Tracked<C>,
    mask: Option<FlexTensor>,
    causal: bool,
    scale: f64,
) -> Tracked<C> {
    let (q, gq) = q.into_parts();
    let (k, gk) = k.into_parts();
    let (v, gv) = v.into_parts();
    let (q, k, v) = (
        attention::prepare(q),
        attention::prepare(k),
        attention::prepare(v),
    );
    let scale = scale as f32;
    match AttentionGrad
        .prepare::<C>([gq, gk, gv])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, lse) = attention::forward(&q, &k, &v, mask.as_ref(), causal, scale, true);
            let state = AttentionState {
                q,
                k,
                v,
                mask,
                out: out.clone(),
                lse: lse.expect("requested"),
                causal,
                scale,
            };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => {
            let (out, _) = attention::forward(&q, &k, &v, mask.as_ref(), causal, scale, false);
            prep.finish(out)
        }
    }
}

/// Where each input of a norm sits among the node's parents.
#[derive(Debug, Clone, Copy)]
struct NormSlots {
    residual: Option<usize>,
    gamma: usize,
    beta: Option<usize>,
}

#[derive(Debug, Clone)]
struct NormState {
    z: FlexTensor,
    gamma: FlexTensor,
    stats: std::sync::Arc<Stats>,
    kind: Norm,
    slots: NormSlots,
}

#[derive(Debug)]
struct NormGrad;

impl<const N: usize> Backward<Flex, N> for NormGrad {
    type State = NormState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        let grad = contiguous(grads.consume::<Flex>(&ops.node));
        let parents = ops.parents;
        let slot = |i: Option<usize>| i.and_then(|i| parents[i].clone());
        let (x_node, r_node) = (parents[0].clone(), slot(s.slots.residual));
        let (g_node, b_node) = (slot(Some(s.slots.gamma)), slot(s.slots.beta));
        let shape = dims(&s.z);
        let width = *shape.last().expect("at least 1-D");
        let needs = norm::Needs {
            input: x_node.is_some() || r_node.is_some(),
            gamma: g_node.is_some(),
            beta: b_node.is_some(),
        };
        let (dz, dgamma, dbeta) = norm::backward(
            slice(&s.z),
            slice(&grad),
            width,
            slice(&s.gamma),
            s.kind,
            &s.stats,
            needs,
        );
        if let Some(dz) = dz {
            let dz = from_vec(dz, &shape);
            // `z = x + residual`: both get `dz`.
            if let Some(node) = r_node {
                grads.register::<Flex>(node.id, dz.clone());
            }
            if let Some(node) = x_node {
                grads.register::<Flex>(node.id, dz);
            }
        }
        if let (Some(node), Some(d)) = (g_node, dgamma) {
            grads.register::<Flex>(node.id, from_vec(d, &[width]));
        }
        if let (Some(node), Some(d)) = (b_node, dbeta) {
            grads.register::<Flex>(node.id, from_vec(d, &[width]));
        }
    }
}

fn norm_op<C: CheckpointStrategy>(
    x: Tracked<C>,
    residual: Option<Tracked<C>>,
    gamma: Tracked<C>,
    beta: Option<Tracked<C>>,
    eps: f64,
    kind: Norm,
) -> Tracked<C> {
    let mut guards = Vec::with_capacity(4);
    let (x, gx) = x.into_parts();
    guards.push(gx);
    let residual = residual.map(|r| {
        let (r, g) = r.into_parts();
        guards.push(g);
        r
    });
    let slots_residual = residual.as_ref().map(|_| 1);
    let (gamma, gg) = gamma.into_parts();
    let gamma_slot = guards.len();
    guards.push(gg);
    let beta = beta.map(|b| {
        let (b, g) = b.into_parts();
        guards.push(g);
        b
    });
    let slots = NormSlots {
        residual: slots_residual,
        gamma: gamma_slot,
        beta: beta.as_ref().map(|_| gamma_slot + 1),
    };
    let run = |x, residual| norm_forward(x, residual, &gamma, beta.as_ref(), eps, kind);
    macro_rules! with_arity {
        ($n:literal) => {{
            let guards: [_; $n] = guards.try_into().expect("arity");
            match NormGrad.prepare::<C>(guards).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let (out, z, stats) = run(x, residual);
                    let state = NormState {
                        z,
                        gamma: contiguous(gamma.clone()),
                        stats: std::sync::Arc::new(stats),
                        kind,
                        slots,
                    };
                    prep.finish(state, out)
                }
                OpsKind::UnTracked(prep) => prep.finish(run(x, residual).0),
            }
        }};
    }
    match guards.len() {
        2 => with_arity!(2),
        3 => with_arity!(3),
        _ => with_arity!(4),
    }
}

#[derive(Debug)]
struct RopeGrad;

impl Backward<Flex, 1> for RopeGrad {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            rope::apply(g, &cos, &sin, true)
        });
    }
}

fn rope_op<C: CheckpointStrategy>(x: Tracked<C>, cos: Tracked<C>, sin: Tracked<C>) -> Tracked<C> {
    // The tables are constants of the positions: no gradient flows to them.
    let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
    let (x, guard) = x.into_parts();
    let out = rope::apply(x, &cos, &sin, false);
    match RopeGrad.prepare::<C>([guard]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((cos, sin), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct SwigluGrad;

impl Backward<Flex, 2> for SwigluGrad {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (a, b) = ops.state;
        let g = contiguous(grads.consume::<Flex>(&ops.node));
        let [na, nb] = ops.parents;
        let (da, db) = elementwise::swiglu_backward(&a, &b, &g);
        if let Some(node) = na {
            grads.register::<Flex>(node.id, da);
        }
        if let Some(node) = nb {
            grads.register::<Flex>(node.id, db);
        }
    }
}

fn swiglu<C: CheckpointStrategy>(a: Tracked<C>, b: Tracked<C>) -> Tracked<C> {
    let (a, ga) = a.into_parts();
    let (b, gb) = b.into_parts();
    let (a, b) = (contiguous(a), contiguous(b));
    let out = elementwise::swiglu(&a, &b);
    match SwigluGrad.prepare::<C>([ga, gb]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish((a, b), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct LogSoftmaxGrad;

impl Backward<Flex, 1> for LogSoftmaxGrad {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let y = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            let g = contiguous(g);
            let shape = dims(&y);
            let width = *shape.last().expect("at least 1-D");
            from_vec(softmax::backward(slice(&y), slice(&g), width), &shape)
        });
    }
}

fn log_softmax<C: CheckpointStrategy>(x: Tracked<C>) -> Tracked<C> {
    let (x, guard) = x.into_parts();
    let y = <Flex as PeftOps>::fused_log_softmax(x);
    match LogSoftmaxGrad
        .prepare::<C>([guard])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

#[derive(Debug)]
struct DropoutGrad;

impl Backward<Flex, 1> for DropoutGrad {
    type State = Mask;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let m = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            let g = contiguous(g);
            from_vec(crate::kernels::dropout::apply(slice(&g), m), &dims(&g))
        });
    }
}

fn dropout<C: CheckpointStrategy>(x: Tracked<C>, prob: f64, key: u64) -> Tracked<C> {
    let Some(m) = mask(prob, key) else {
        return x;
    };
    let (x, guard) = x.into_parts();
    let y = <Flex as PeftOps>::fused_dropout(x, prob, key);
    match DropoutGrad.prepare::<C>([guard]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(m, y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    }
}

#[derive(Debug, Clone)]
struct LoraState {
    x: FlexTensor,
    a: FlexTensor,
    b: FlexTensor,
    low: FlexTensor,
    scaling: f32,
    mask: Option<Mask>,
}

#[derive(Debug)]
struct LoraGrad;

impl Backward<Flex, 4> for LoraGrad {
    type State = LoraState;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        let grad = grads.consume::<Flex>(&ops.node);
        let [nx, ny, na, nb] = ops.parents;
        let needs = lora::Needs {
            x: nx.is_some(),
            a: na.is_some(),
            b: nb.is_some(),
        };
        let (dx, da, db) =
            lora::backward(&s.x, &s.a, &s.b, &s.low, &grad, s.scaling, s.mask, needs);
        if let Some(node) = ny {
            grads.register::<Flex>(node.id, grad);
        }
        for (node, g) in [(nx, dx), (na, da), (nb, db)] {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<Flex>(node.id, g);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn lora_op<C: CheckpointStrategy>(
    x: Tracked<C>,
    y: Tracked<C>,
    a: Tracked<C>,
    b: Tracked<C>,
    scaling: f64,
    prob: f64,
    key: u64,
) -> Tracked<C> {
    let (x, gx) = x.into_parts();
    let (y, gy) = y.into_parts();
    let (a, ga) = a.into_parts();
    let (b, gb) = b.into_parts();
    let (x, a, b) = (contiguous(x), contiguous(a), contiguous(b));
    let m = mask(prob, key);
    let scaling = scaling as f32;
    let (out, low) = lora::forward(&x, y, &a, &b, scaling, m);
    match LoraGrad
        .prepare::<C>([gx, gy, ga, gb])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = LoraState {
                x,
                a,
                b,
                low,
                scaling,
                mask: m,
            };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

impl<C: CheckpointStrategy> PeftOps for Autodiff<Flex, C> {
    fn fused_gelu(x: Tracked<C>) -> Tracked<C> {
        gelu::<C>(x, Gelu::Erf)
    }

    fn fused_gelu_tanh(x: Tracked<C>) -> Tracked<C> {
        gelu::<C>(x, Gelu::Tanh)
    }

    fn fused_attention(
        q: Tracked<C>,
        k: Tracked<C>,
        v: Tracked<C>,
        causal: bool,
        scale: f64,
    ) -> Tracked<C> {
        sdpa::<C>(q, k, v, None, causal, scale)
    }

    fn fused_attention_masked(
        q: Tracked<C>,
        k: Tracked<C>,
        v: Tracked<C>,
        mask: FlexTensor,
        causal: bool,
        scale: f64,
    ) -> Tracked<C> {
        sdpa::<C>(q, k, v, Some(mask), causal, scale)
    }

    fn fused_layer_norm(
        x: Tracked<C>,
        gamma: Tracked<C>,
        beta: Tracked<C>,
        eps: f64,
    ) -> Tracked<C> {
        norm_op::<C>(x, None, gamma, Some(beta), eps, Norm::Layer)
    }

    fn fused_add_layer_norm(
        x: Tracked<C>,
        residual: Tracked<C>,
        gamma: Tracked<C>,
        beta: Tracked<C>,
        eps: f64,
    ) -> Tracked<C> {
        norm_op::<C>(x, Some(residual), gamma, Some(beta), eps, Norm::Layer)
    }

    fn fused_rms_norm(x: Tracked<C>, gamma: Tracked<C>, eps: f64) -> Tracked<C> {
        norm_op::<C>(x, None, gamma, None, eps, Norm::Rms)
    }

    fn fused_rope(x: Tracked<C>, cos: Tracked<C>, sin: Tracked<C>) -> Tracked<C> {
        rope_op::<C>(x, cos, sin)
    }

    fn fused_swiglu(a: Tracked<C>, b: Tracked<C>) -> Tracked<C> {
        swiglu::<C>(a, b)
    }

    fn fused_log_softmax(x: Tracked<C>) -> Tracked<C> {
        log_softmax::<C>(x)
    }

    fn fused_dropout(x: Tracked<C>, prob: f64, key: u64) -> Tracked<C> {
        dropout::<C>(x, prob, key)
    }

    fn fused_adamw(
        p: Tracked<C>,
        g: Tracked<C>,
        m: Tracked<C>,
        v: Tracked<C>,
        step: AdamWStep,
    ) -> (Tracked<C>, Tracked<C>, Tracked<C>) {
        // An optimizer update is outside the graph: run it on the inner tensors.
        let (p, m, v) = <Flex as PeftOps>::fused_adamw(
            p.into_primitive(),
            g.into_primitive(),
            m.into_primitive(),
            v.into_primitive(),
            step,
        );
        (
            Self::from_inner(p),
            Self::from_inner(m),
            Self::from_inner(v),
        )
    }

    fn fused_sum_squares(x: Tracked<C>) -> Tracked<C> {
        Self::from_inner(<Flex as PeftOps>::fused_sum_squares(x.into_primitive()))
    }

    fn fused_lora(
        x: Tracked<C>,
        y: Tracked<C>,
        a: Tracked<C>,
        b: Tracked<C>,
        scaling: f64,
        prob: f64,
        key: u64,
    ) -> Tracked<C> {
        lora_op::<C>(x, y, a, b, scaling, prob, key)
    }

    fn fused_quant_matmul(x: Tracked<C>, w: Arc<QuantMatrix>) -> Tracked<C> {
        frozen::quant_op::<C>(x, w, false)
    }

    fn fused_quant_matmul_t(dy: Tracked<C>, w: Arc<QuantMatrix>) -> Tracked<C> {
        frozen::quant_op::<C>(dy, w, true)
    }

    fn fused_quant_swiglu(
        x: Tracked<C>,
        gate: Arc<QuantMatrix>,
        up: Arc<QuantMatrix>,
    ) -> Tracked<C> {
        frozen::quant_swiglu::<C>(x, gate, up)
    }

    fn fused_few_rows_matmul(x: Tracked<C>, w: Tracked<C>) -> Tracked<C> {
        // `crate::few_rows` sends no tracked `w`: only `x` may have a gradient.
        frozen::frozen_op::<C>(x, w.into_primitive())
    }
}
