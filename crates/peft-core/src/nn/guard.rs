//! A mixed batch cannot be ignored by mistake: in debug builds, a plain `forward` on an adapted
//! site panics while a mixed-adapter batch is in flight on the calling thread.
//!
//! A site learns each row's adapter only through the [`ForwardContext`] handed to its
//! `forward_in`. A model whose forward passes the context to most sites but calls `forward` on
//! one of them would run that site with the model's active adapters on every row: wrong
//! numbers, no error (PEFT has the same hole for layers that drop `adapter_names`). The layer
//! cannot see the context in `forward`, so the thread remembers the mixed batch instead:
//!
//! - [`ForwardContext::mixed`] and every `forward_in` with per-row adapters mark the thread
//!   with (a weak handle to) the batch's [`RowAdapters`];
//! - a `forward_in` with an ordinary context clears the mark: the thread has moved on to a
//!   batch without per-row adapters;
//! - the mark lapses by itself when the last clone of the mixed context is dropped.
//!
//! `Linear::forward` and `Embedding::forward` on a layer holding adapters or
//! `modules_to_save` copies panic while the mark is live, naming `forward_in`. Release builds
//! compile all of this away: the forward hot path pays nothing there.

#[cfg(debug_assertions)]
use std::cell::RefCell;
#[cfg(debug_assertions)]
use std::sync::{Arc, Weak};

use super::ForwardContext;
#[cfg(debug_assertions)]
use super::RowAdapters;

#[cfg(debug_assertions)]
thread_local! {
    /// The mixed batch this thread is running, if any (see the module docs).
    static IN_FLIGHT: RefCell<Weak<RowAdapters>> = const { RefCell::new(Weak::new()) };
}

/// Mark (a mixed `ctx`) or clear (an ordinary one) the calling thread's mixed batch.
#[inline]
pub(crate) fn enter(ctx: &ForwardContext) {
    #[cfg(debug_assertions)]
    IN_FLIGHT.with(|slot| {
        let mut slot = slot.borrow_mut();
        match ctx.rows_arc() {
            // Every site of a forward sees the same batch: compare before taking a new handle.
            // (A live `Weak` keeps its allocation, so the address cannot be reused meanwhile.)
            Some(rows) if !std::ptr::eq(slot.as_ptr(), Arc::as_ptr(rows)) => {
                *slot = Arc::downgrade(rows)
            }
            Some(_) => {}
            None => *slot = Weak::new(),
        }
    });
    #[cfg(not(debug_assertions))]
    let _ = ctx;
}

/// Panic (debug builds) when a plain `forward` of `layer` would ignore the per-row adapters of
/// a mixed batch in flight on this thread; `adapted`: whether the layer holds anything a row
/// could select (adapters or `modules_to_save` copies), so plain layers of the same model are
/// not affected.
#[inline]
pub(crate) fn refuse_plain_forward(layer: &str, adapted: impl FnOnce() -> bool) {
    #[cfg(debug_assertions)]
    {
        let rows = IN_FLIGHT.with(|slot| slot.borrow().upgrade());
        if let Some(rows) = rows
            && adapted()
        {
            panic!(
                "`{layer}::forward` called during a mixed-adapter batch ({} rows: {}): a plain \
                 `forward` runs the model's active adapters on every row and would ignore each \
                 row's own. Pass the batch's `ForwardContext` down and call \
                 `{layer}::forward_in(x, ctx)`; for a batch without per-row adapters, call \
                 `forward_in(x, &ForwardContext::default())` or drop the mixed context first \
                 (this check runs in debug builds only)",
                rows.batch(),
                describe(&rows),
            );
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = (layer, adapted);
}

#[cfg(debug_assertions)]
fn describe(rows: &RowAdapters) -> String {
    let names: Vec<&str> = (0..rows.batch().min(8))
        .map(|r| rows.adapter_of(r).unwrap_or(super::BASE_ROW))
        .collect();
    let more = if rows.batch() > 8 { ", ..." } else { "" };
    format!("{}{more}", names.join(", "))
}
