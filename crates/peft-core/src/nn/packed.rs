//! Packed rows: several short sequences placed one after another in one batch row, as TRL's
//! `packing=True` and axolotl's sample packing build them, so that training spends no compute
//! on padding. A forward that knows the boundaries keeps the sequences apart: each token
//! attends only to earlier tokens of its own sequence and positions restart at every sequence
//! (what transformers does for packed `position_ids`, `masking_utils.find_packed_sequence_indices`,
//! and flash-attention's `cu_seqlens` varlen path), so a packed row gives each sequence the
//! outputs it would get alone.

/// The sequences of each row of a packed batch, as lengths in row order; the columns after a
/// row's last sequence are padding.
///
/// ```
/// use peft_core::nn::PackedRows;
///
/// // Row 0 holds sequences of 3 and 2 tokens, row 1 one of 4 (then padding).
/// let packed = PackedRows::new(vec![vec![3, 2], vec![4]]).unwrap();
/// assert_eq!(packed.batch(), 2);
/// assert_eq!(packed.tokens(0), 5);
/// // Position of every column of a 5-column row: each sequence starts at 0.
/// assert_eq!(packed.positions(0, 5), [0, 1, 2, 0, 1]);
/// assert_eq!(packed.sequence_ids(1, 5), [Some(0), Some(0), Some(0), Some(0), None]);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRows {
    lengths: Vec<Vec<usize>>,
}

impl PackedRows {
    /// The sequence lengths of every row; `None` when a length is 0 (an empty sequence has no
    /// token to hold its place).
    pub fn new(lengths: Vec<Vec<usize>>) -> Option<Self> {
        lengths
            .iter()
            .all(|row| row.iter().all(|&n| n > 0))
            .then_some(Self { lengths })
    }

    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.lengths.len()
    }

    /// The sequence lengths of `row` (empty past the last row).
    pub fn lengths(&self, row: usize) -> &[usize] {
        self.lengths.get(row).map_or(&[], Vec::as_slice)
    }

    /// The tokens `row`'s sequences hold together.
    pub fn tokens(&self, row: usize) -> usize {
        self.lengths(row).iter().sum()
    }

    /// The largest [`tokens`](Self::tokens) of any row.
    pub fn longest_row(&self) -> usize {
        (0..self.batch()).map(|r| self.tokens(r)).max().unwrap_or(0)
    }

    /// Which sequence each of the first `columns` columns of `row` belongs to (`None` past
    /// the last sequence: padding).
    pub fn sequence_ids(&self, row: usize, columns: usize) -> Vec<Option<usize>> {
        let mut ids: Vec<Option<usize>> = self
            .lengths(row)
            .iter()
            .enumerate()
            .flat_map(|(i, &n)| std::iter::repeat_n(Some(i), n))
            .take(columns)
            .collect();
        ids.resize(columns, None);
        ids
    }

    /// The position of each of the first `columns` columns of `row` inside its own sequence
    /// (padding columns continue the last sequence, as a right-padded row's would).
    pub fn positions(&self, row: usize, columns: usize) -> Vec<i64> {
        let mut positions: Vec<i64> = self
            .lengths(row)
            .iter()
            .flat_map(|&n| 0..n as i64)
            .take(columns)
            .collect();
        let mut next = positions.last().map_or(0, |p| p + 1);
        while positions.len() < columns {
            positions.push(next);
            next += 1;
        }
        positions
    }
}
