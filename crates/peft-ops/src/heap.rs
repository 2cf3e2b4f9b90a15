//! glibc's heap keeps a forward's memory for the next one (a training step, a decode step).
//!
//! Found on the MiniLM LoRA step (benches/results: `lora_nodrop_vs_burn`): glibc trimmed the
//! top of its heap after every backward, so every forward page-faulted its ~115 MiB of
//! activations in again (about 39,500 faults, 16% of the step's CPU), and Burn's `apply_lora`
//! row only looked faster because its long-lived allocations happened to block the trim.
//! Decoding had the same cost in another form: each step's buffers above glibc's 128 KiB mmap
//! threshold (logits, a batch's activations) were mapped, faulted in and unmapped again.

use std::sync::atomic::{AtomicBool, Ordering};

static DONE: AtomicBool = AtomicBool::new(false);

/// On the first forward, tell glibc's `malloc` to keep freed memory instead of handing it
/// back to the kernel.
///
/// A step allocates its activations as the forward goes (about 115 MiB of heap on MiniLM at
/// 16 x 64) and frees them in the backward. By default glibc trims the top of its heap once
/// more than twice its (dynamic) mmap threshold is free there, about 13 MiB once a 6 MiB
/// activation has been freed: the heap can shrink back to its floor after every step, and
/// the next forward then takes every page again, a page fault and a zeroed page per 4 KiB
/// (about 40 000 a step for LoRA on MiniLM's query/value, a sixth of the step's CPU time).
/// Whether it does depends on where the few allocations that outlive a step land: Burn's
/// own `apply_lora`, LoRA on every linear layer or prefix tuning escaped most of it by
/// chance, which made them look faster than LoRA on query/value.
/// `M_MMAP_THRESHOLD` at 32 MiB (glibc's largest) keeps activations on the heap, where they
/// are reused, and `M_TRIM_THRESHOLD` at -1 stops the trim; the resident set stays at the
/// step's peak, which the process reached anyway. Values do not change.
///
/// Decoding gains too, since no step maps and faults in its larger buffers afresh:
/// SmolLM2-135M (f32) at 32 sequences went from 263 / 254 to 293 / 275 tokens/s
/// (`PEFT_MALLOC_TUNE=0` against the default, alternating, 2 threads; 226 / 242 against 265 /
/// 307 in an earlier pair), with the same peak RSS. One sequence gains nothing measurable.
/// Batched inference gains most: one all-MiniLM-L6-v2 forward of 16 x 64 tokens took 226 / 231
/// ms with `PEFT_MALLOC_TUNE=0` against 175 / 166 ms (medians of 10, alternating).
///
/// Process-wide and once. Off with `PEFT_MALLOC_TUNE=0`, and left alone when the
/// environment already sets these (`MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`,
/// `MALLOC_TOP_PAD_`, `MALLOC_MMAP_MAX_`, `glibc.malloc` tunables). Only on glibc
/// (elsewhere nothing); a program with its own global allocator is not affected.
/// `peft_core::nn::Linear` calls it on every forward, so any training loop, `generate` and
/// `serve` get it.
///
/// ```
/// // The first call tunes malloc; every later call returns at once.
/// peft_ops::heap::keep_freed_memory();
/// ```
pub fn keep_freed_memory() {
    if DONE.load(Ordering::Relaxed) {
        return;
    }
    if !DONE.swap(true, Ordering::Relaxed) && wanted() {
        tune();
    }
}

fn wanted() -> bool {
    let var = |name: &str| std::env::var(name).ok();
    var("PEFT_MALLOC_TUNE").is_none_or(|v| v != "0")
        && var("GLIBC_TUNABLES").is_none_or(|v| !v.contains("glibc.malloc."))
        && ![
            "MALLOC_TRIM_THRESHOLD_",
            "MALLOC_MMAP_THRESHOLD_",
            "MALLOC_TOP_PAD_",
            "MALLOC_MMAP_MAX_",
        ]
        .into_iter()
        .any(|name| std::env::var_os(name).is_some())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune() {
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    // SAFETY: `mallopt` only sets malloc's parameters (under its own lock). Setting either
    // freezes the mmap threshold, so the trim is left alone unless the threshold took: a
    // frozen 128 KiB one would map (and fault in) every activation afresh.
    unsafe {
        if mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 {
            mallopt(M_TRIM_THRESHOLD, -1);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune() {}
