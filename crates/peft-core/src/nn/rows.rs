//! The forward context: what changes a forward per call rather than per model, passed down
//! with the input. Today that is the adapter of each row of a mixed batch (PEFT's
//! `adapter_names=[...]`): one forward serves rows of different adapters, the frozen base GEMM
//! runs once for the whole batch and each adapter's low-rank part only on its own rows.

use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor, TensorData};

use super::PackedRows;

/// The name PEFT uses in `adapter_names` for rows that run the base model alone.
pub const BASE_ROW: &str = "__base__";

/// The rows of one adapter in a mixed batch.
#[derive(Debug, Clone)]
pub struct RowGroup {
    /// The adapter, `None` for the base model.
    pub adapter: Option<String>,
    /// The batch rows, ascending.
    pub rows: Vec<usize>,
    /// The same rows as a tensor, for `select` / `select_assign` on dimension 0.
    pub index: Tensor<1, Int>,
}

/// Which adapter each row of a batch uses; rows grouped by adapter (in order of first
/// appearance), so a site computes each adapter once over all of its rows.
///
/// ```
/// use burn::tensor::Device;
/// use peft_core::nn::RowAdapters;
///
/// let rows = RowAdapters::new(&["a", "__base__", "a", "b"], &Device::flex());
/// assert_eq!(rows.batch(), 4);
/// let groups: Vec<(Option<&str>, &[usize])> = rows
///     .groups()
///     .iter()
///     .map(|g| (g.adapter.as_deref(), g.rows.as_slice()))
///     .collect();
/// assert_eq!(groups, [(Some("a"), &[0, 2][..]), (None, &[1][..]), (Some("b"), &[3][..])]);
/// ```
#[derive(Debug, Clone)]
pub struct RowAdapters {
    names: Vec<Option<String>>,
    groups: Vec<RowGroup>,
}

impl RowAdapters {
    /// Group `names` (one per row; [`BASE_ROW`] for none). The names are not checked here:
    /// [`PeftModel::adapter_rows`](crate::PeftModel::adapter_rows) checks them against the
    /// model's adapters.
    pub fn new(names: &[&str], device: &Device) -> Self {
        let names: Vec<Option<String>> = names
            .iter()
            .map(|n| (*n != BASE_ROW).then(|| n.to_string()))
            .collect();
        let mut groups: Vec<(Option<String>, Vec<usize>)> = Vec::new();
        for (row, name) in names.iter().enumerate() {
            match groups.iter_mut().find(|(n, _)| n == name) {
                Some((_, rows)) => rows.push(row),
                None => groups.push((name.clone(), vec![row])),
            }
        }
        let groups = groups
            .into_iter()
            .map(|(adapter, rows)| {
                let ids: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
                let index = Tensor::from_data(TensorData::new(ids, [rows.len()]), device);
                RowGroup {
                    adapter,
                    rows,
                    index,
                }
            })
            .collect();
        Self { names, groups }
    }

    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.names.len()
    }

    /// The adapter of row `row` (`None`: the base model).
    pub fn adapter_of(&self, row: usize) -> Option<&str> {
        self.names.get(row).and_then(|n| n.as_deref())
    }

    /// The groups of rows sharing an adapter.
    pub fn groups(&self) -> &[RowGroup] {
        &self.groups
    }

    /// The groups that use an adapter (not the base model).
    pub fn adapter_groups(&self) -> impl Iterator<Item = (&str, &RowGroup)> {
        self.groups
            .iter()
            .filter_map(|g| g.adapter.as_deref().map(|a| (a, g)))
    }
}

/// Per-call forward settings, passed down from the model's forward to every site.
///
/// The default runs the model's active adapters on every row (what `set_adapter` chose).
/// [`ForwardContext::mixed`] runs a different adapter per row.
#[derive(Debug, Clone, Default)]
pub struct ForwardContext {
    rows: Option<Arc<RowAdapters>>,
    id_bounds: Option<IdBounds>,
    type_id_bounds: Option<IdBounds>,
    packed: Option<Arc<PackedRows>>,
}

impl ForwardContext {
    /// One adapter per row (see [`RowAdapters`]); the model's active adapters do not apply.
    ///
    /// While the context lives, an adapted layer's plain `forward` on this thread panics in
    /// debug builds (it would ignore the rows' adapters; see
    /// [`Linear::forward`](crate::nn::Linear::forward)), until a `forward_in` with an ordinary
    /// context runs.
    pub fn mixed(rows: RowAdapters) -> Self {
        let ctx = Self {
            rows: Some(Arc::new(rows)),
            ..Self::default()
        };
        super::guard::enter(&ctx);
        ctx
    }

    /// The per-row adapters, if this is a mixed batch.
    pub fn rows(&self) -> Option<&RowAdapters> {
        self.rows.as_deref()
    }

    /// The shared per-row adapters, for the debug guard's weak handle (`nn::guard`).
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    pub(crate) fn rows_arc(&self) -> Option<&Arc<RowAdapters>> {
        self.rows.as_ref()
    }

    /// The same context, with the bounds of the batch's ids as the caller computed them on the
    /// host while it built the tensors (see [`IdBounds`]).
    ///
    /// ```
    /// use peft_core::nn::{ForwardContext, IdBounds};
    ///
    /// let ids = [[101_i64, 2023, 102], [101, 102, 0]];
    /// let bounds = IdBounds::of(ids.iter().flatten().copied()).unwrap();
    /// assert_eq!(bounds, IdBounds { min: 0, max: 2023 });
    /// let fc = ForwardContext::default().with_id_bounds(bounds, None);
    /// assert_eq!(fc.id_bounds(), (Some(bounds), None));
    /// ```
    pub fn with_id_bounds(mut self, input_ids: IdBounds, token_type_ids: Option<IdBounds>) -> Self {
        self.id_bounds = Some(input_ids);
        self.type_id_bounds = token_type_ids;
        self
    }

    /// The host-side bounds of `input_ids` and of `token_type_ids`, where the caller gave them.
    pub fn id_bounds(&self) -> (Option<IdBounds>, Option<IdBounds>) {
        (self.id_bounds, self.type_id_bounds)
    }

    /// The same context for a packed batch: each row holds the sequences `packed` names, kept
    /// apart in attention and positions by the decoder families ([`PackedRows`]).
    ///
    /// ```
    /// use peft_core::nn::{ForwardContext, PackedRows};
    ///
    /// let packed = PackedRows::new(vec![vec![3, 2]]).unwrap();
    /// let fc = ForwardContext::default().with_packed(packed.clone());
    /// assert_eq!(fc.packed(), Some(&packed));
    /// ```
    pub fn with_packed(mut self, packed: PackedRows) -> Self {
        self.packed = Some(Arc::new(packed));
        self
    }

    /// The sequences of each row, for a packed batch.
    pub fn packed(&self) -> Option<&PackedRows> {
        self.packed.as_deref()
    }
}

/// The smallest and largest value of an integer input (token ids, segment ids), known on the
/// host.
///
/// Every forward checks its ids against the vocabulary before a lookup could go out of range.
/// Without bounds that check reads the minimum and maximum back from the device, which on a GPU
/// waits for everything queued before it: one stall per forward. A caller that built the tensor
/// from host values (the trainer's collation) passes the bounds it saw, and on devices other
/// than flex the forward checks those instead. On flex the forward always reads (it costs
/// nothing there), so wrong bounds can never turn into an out-of-range lookup on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdBounds {
    /// The smallest value.
    pub min: i64,
    /// The largest value.
    pub max: i64,
}

impl IdBounds {
    /// The bounds of `values`; `None` when there are none.
    pub fn of(values: impl IntoIterator<Item = i64>) -> Option<Self> {
        values.into_iter().fold(None, |acc, v| {
            Some(match acc {
                None => Self { min: v, max: v },
                Some(b) => Self {
                    min: b.min.min(v),
                    max: b.max.max(v),
                },
            })
        })
    }

    /// Whether every value lies in `0..size`.
    pub fn within(&self, size: usize) -> bool {
        self.min >= 0 && (self.max as u64) < size as u64
    }
}
