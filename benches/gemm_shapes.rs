//! The `gemm` crate alone (burn-flex's GEMM) at the GEMM shapes of an all-MiniLM-L6-v2 step
//! (16 x 64 tokens, hidden 384, intermediate 1536): forward `x·W`, the input gradient
//! `g·Wᵀ` and the weight gradient `xᵀ·g`, as burn-flex calls it (`W` stored `[in, out]`
//! row-major; the transposed operands are strided views, as Burn's matmul backward passes
//! them). Prints the median milliseconds per product, for `benches/gemm_shapes.py`'s PyTorch
//! numbers next to it. Run: `RAYON_NUM_THREADS=2 cargo bench --bench gemm_shapes`.

use std::time::Instant;

struct Shape {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    /// Left operand transposed (stored `[k, m]` row-major).
    lhs_t: bool,
    /// Right operand transposed (stored `[n, k]` row-major).
    rhs_t: bool,
}

const SHAPES: &[Shape] = &[
    Shape {
        name: "fwd  x[1024,384]·W[384,1536]",
        m: 1024,
        k: 384,
        n: 1536,
        lhs_t: false,
        rhs_t: false,
    },
    Shape {
        name: "fwd  x[1024,1536]·W[1536,384]",
        m: 1024,
        k: 1536,
        n: 384,
        lhs_t: false,
        rhs_t: false,
    },
    Shape {
        name: "fwd  x[1024,384]·W[384,384]",
        m: 1024,
        k: 384,
        n: 384,
        lhs_t: false,
        rhs_t: false,
    },
    Shape {
        name: "dX   g[1024,1536]·Wᵀ (W[384,1536])",
        m: 1024,
        k: 1536,
        n: 384,
        lhs_t: false,
        rhs_t: true,
    },
    Shape {
        name: "dX   g[1024,384]·Wᵀ (W[1536,384])",
        m: 1024,
        k: 384,
        n: 1536,
        lhs_t: false,
        rhs_t: true,
    },
    Shape {
        name: "dX   g[1024,384]·Wᵀ (W[384,384])",
        m: 1024,
        k: 384,
        n: 384,
        lhs_t: false,
        rhs_t: true,
    },
    Shape {
        name: "dW   xᵀ·g (x[1024,384], g[1024,1536])",
        m: 384,
        k: 1024,
        n: 1536,
        lhs_t: true,
        rhs_t: false,
    },
    Shape {
        name: "dW   xᵀ·g (x[1024,1536], g[1024,384])",
        m: 1536,
        k: 1024,
        n: 384,
        lhs_t: true,
        rhs_t: false,
    },
    Shape {
        name: "dW   xᵀ·g (x[1024,384], g[1024,384])",
        m: 384,
        k: 1024,
        n: 384,
        lhs_t: true,
        rhs_t: false,
    },
];

/// The GEMMs of a LoRA step at SmolLM2-135M's shape (2 x 128 tokens, hidden 576, k/v 192,
/// intermediate 1536, a tied head of 49,152 rows stored `[vocab, hidden]`): forward and input
/// gradient only, since the base is frozen (`GEMM_SET=llm`).
const LLM_SHAPES: &[Shape] = &[
    Shape {
        name: "fwd  x[256,576]·W[576,576] (q, o)",
        m: 256,
        k: 576,
        n: 576,
        lhs_t: false,
        rhs_t: false,
    },
    Shape {
        name: "fwd  x[256,576]·W[576,192] (k, v)",
        m: 256,
        k: 576,
        n: 192,
        lhs_t: false,
        rhs_t: false,
    },
    Shape {
        name: "fwd  x[256,576]·W[576,1536] (gate, up)",
        m: 256,
        k: 576,
        n: 1536,
        lhs_t: false,
        rhs_t: false,
    },
    Shape {
        name: "fwd  x[256,1536]·W[1536,576] (down)",
        m: 256,
        k: 1536,
        n: 576,
        lhs_t: false,
        rhs_t: false,
    },
    Shape {
        name: "fwd  x[256,576]·Eᵀ (head, E[49152,576])",
        m: 256,
        k: 576,
        n: 49152,
        lhs_t: false,
        rhs_t: true,
    },
    Shape {
        name: "dX   g[256,576]·Wᵀ (W[576,576])",
        m: 256,
        k: 576,
        n: 576,
        lhs_t: false,
        rhs_t: true,
    },
    Shape {
        name: "dX   g[256,192]·Wᵀ (W[576,192])",
        m: 256,
        k: 192,
        n: 576,
        lhs_t: false,
        rhs_t: true,
    },
    Shape {
        name: "dX   g[256,1536]·Wᵀ (W[576,1536])",
        m: 256,
        k: 1536,
        n: 576,
        lhs_t: false,
        rhs_t: true,
    },
    Shape {
        name: "dX   g[256,576]·Wᵀ (W[1536,576])",
        m: 256,
        k: 576,
        n: 1536,
        lhs_t: false,
        rhs_t: true,
    },
    Shape {
        name: "dX   g[256,49152]·E (head)",
        m: 256,
        k: 49152,
        n: 576,
        lhs_t: false,
        rhs_t: false,
    },
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let iters: usize = std::env::var("GEMM_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let threads = rayon::current_num_threads();
    println!("gemm crate, f32, {threads} rayon thread(s), median of {iters}");
    let llm = std::env::var("GEMM_SET").is_ok_and(|v| v == "llm");
    for s in if llm { LLM_SHAPES } else { SHAPES } {
        let lhs: Vec<f32> = (0..s.m * s.k)
            .map(|i| ((i % 97) as f32 - 48.0) * 0.01)
            .collect();
        let rhs: Vec<f32> = (0..s.k * s.n)
            .map(|i| ((i % 89) as f32 - 44.0) * 0.01)
            .collect();
        let mut dst = vec![0f32; s.m * s.n];
        // Strides (row, col) of the logical [m, k] and [k, n] operands.
        let (lrs, lcs) = if s.lhs_t {
            (1, s.m as isize)
        } else {
            (s.k as isize, 1)
        };
        let (rrs, rcs) = if s.rhs_t {
            (1, s.k as isize)
        } else {
            (s.n as isize, 1)
        };
        let mut times = Vec::with_capacity(iters);
        for i in 0..iters + 3 {
            let t = Instant::now();
            // SAFETY: the buffers hold the shapes the strides describe.
            unsafe {
                gemm::gemm(
                    s.m,
                    s.n,
                    s.k,
                    dst.as_mut_ptr(),
                    1,
                    s.n as isize,
                    false,
                    lhs.as_ptr(),
                    lcs,
                    lrs,
                    rhs.as_ptr(),
                    rcs,
                    rrs,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                );
            }
            if i >= 3 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let ms = median(times);
        let gflops = 2.0 * (s.m * s.n * s.k) as f64 / ms / 1e6;
        println!("{:<42} {:>8.3} ms {:>7.1} GFLOP/s", s.name, ms, gflops);
    }
    if !llm {
        through_burn(iters);
    }
}

/// The forward shapes again through Burn's tensor API on flex: `matmul` alone, and `linear`
/// (matmul + bias, what every `peft_core::nn::Linear` runs), to separate the GEMM from what
/// Burn adds around it (output allocation, the bias pass).
fn through_burn(iters: usize) {
    use burn::tensor::module::linear;
    use burn::tensor::{Device, Distribution, Tensor};
    let device = Device::flex();
    println!("through Burn (flex), median of {iters}");
    for (m, k, n) in [(1024, 384, 1536), (1024, 1536, 384), (1024, 384, 384)] {
        let x = Tensor::<2>::random([m, k], Distribution::Default, &device);
        let w = Tensor::<2>::random([k, n], Distribution::Default, &device);
        let b = Tensor::<1>::random([n], Distribution::Default, &device);
        let time = |f: &dyn Fn() -> Tensor<2>| {
            let mut v = Vec::with_capacity(iters);
            for i in 0..iters + 3 {
                let t = Instant::now();
                std::hint::black_box(f());
                if i >= 3 {
                    v.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            median(v)
        };
        let mm = time(&|| x.clone().matmul(w.clone()));
        let lin = time(&|| linear(x.clone(), w.clone(), Some(b.clone())));
        println!("fwd  [{m},{k}]·[{k},{n}]  matmul {mm:>7.3} ms   linear (+bias) {lin:>7.3} ms");
    }
}
