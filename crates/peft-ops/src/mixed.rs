//! LoRA over the rows of a mixed-adapter batch (PEFT's `adapter_names=[...]`) as one op.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor};

use crate::kernels::mixed_lora::{self, Factors, Shape};
use crate::kernels::tensor::{contiguous, exclusive, owned, slice};

/// One adapter's low-rank change at a linear site, `scaling·(x·A)·B`, for [`mixed_lora`].
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `A`, `[in, r]`.
    pub a: Tensor<2>,
    /// `B`, `[r, out]`.
    pub b: Tensor<2>,
    /// The scale (LoRA's `lora_alpha / r`).
    pub scaling: f64,
}

/// `y` `[n, out]` with `adapters[k].scaling·(x[i]·A_k)·B_k` added to every row `i` of `x`
/// `[n, in]` whose batch row has slot `Some(k)`. The `n` rows are `slots.len()` batch rows of
/// `n / slots.len()` consecutive rows each (a sequence's positions); rows of slot `None` keep
/// `y`.
///
/// On flex, in inference (no autodiff device) and in `f32`, one pass over the rows that reads
/// each adapter's factors in place and adds into `y`'s own buffer when nothing else holds it.
/// Elsewhere the composition PEFT's `_mixed_batch_forward` runs (per adapter: gather its rows,
/// two matmuls, scatter-add), which autodiff differentiates. Both give the same values up to
/// the order of the sums.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use peft_ops::LowRank;
///
/// let device = Device::flex();
/// let x = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], &device);
/// let y = Tensor::<2>::zeros([3, 2], &device);
/// let double = LowRank {
///     a: Tensor::from_floats([[1.0], [1.0]], &device), // [2, r = 1]: x0 + x1
///     b: Tensor::from_floats([[1.0, -1.0]], &device),  // [1, 2]
///     scaling: 2.0,
/// };
/// let y = peft_ops::mixed_lora(x, y, &[Some(0), None, Some(0)], &[double]);
/// assert_eq!(
///     y.into_data().try_to_vec::<f32>().unwrap(),
///     [6.0, -6.0, 0.0, 0.0, 22.0, -22.0]
/// );
/// ```
///
/// # Panics
/// If `n` is not a multiple of `slots.len()`, a slot names no adapter, or the shapes do not
/// chain (the callers build all of them from the same model).
pub fn mixed_lora(
    x: Tensor<2>,
    y: Tensor<2>,
    slots: &[Option<usize>],
    adapters: &[LowRank],
) -> Tensor<2> {
    let [n, d_in] = x.dims();
    let d_out = y.dims()[1];
    assert!(
        !slots.is_empty() && n % slots.len() == 0,
        "mixed_lora: {n} rows do not split into {} batch rows",
        slots.len()
    );
    assert_eq!(y.dims()[0], n, "mixed_lora: x and y differ in rows");
    assert!(
        slots.iter().flatten().all(|&k| k < adapters.len()),
        "mixed_lora: a slot names no adapter"
    );
    let per_row = n / slots.len();
    let fused = crate::fused(&x)
        && !x.device().is_autodiff()
        && std::iter::once(&y)
            .chain(adapters.iter().flat_map(|f| [&f.a, &f.b]))
            .all(|t| t.dtype() == DType::F32 && !t.device().is_autodiff());
    if !fused {
        return crate::reference::mixed_lora(x, y, slots, adapters);
    }
    let flex = |t: Tensor<2>| {
        contiguous(
            t.try_into_primitive::<Flex>()
                .expect("checked: a flex tensor without autodiff"),
        )
    };
    let x = flex(x);
    let factors: Vec<_> = adapters
        .iter()
        .map(|f| (flex(f.a.clone()), flex(f.b.clone()), f.scaling as f32))
        .collect();
    let views: Vec<Factors<'_>> = factors
        .iter()
        .map(|(a, b, scaling)| Factors {
            a: slice(a),
            b: slice(b),
            r: a.layout().shape()[1],
            scaling: *scaling,
        })
        .collect();
    let mut out = owned(flex(y));
    let buf = exclusive(&mut out).expect("a fresh tensor owns its buffer");
    let shape = Shape {
        d_in,
        d_out,
        per_row,
    };
    mixed_lora::add_in_place(slice(&x), buf, shape, slots, &views);
    Tensor::from_primitive::<Flex>(out)
}
