//! [`QuantBytes`]: shared, immutable bytes (a slice of a file buffer or an owned vector).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use super::QuantError;

/// Shared bytes (a range of a file buffer, a memory map, or an owned vector) without copying:
/// cloning shares the owner.
///
/// The owner must not change its contents or length while a `QuantBytes` holds it (a memory
/// map of a file that is rewritten in place breaks this, as it would for any reader).
///
/// ```
/// use std::sync::Arc;
/// use peft_ops::quant::QuantBytes;
///
/// let file: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(vec![0u8, 1, 2, 3, 4, 5]);
/// let b = QuantBytes::new(file.clone(), 2..5).unwrap();
/// assert_eq!(b.as_slice(), &[2, 3, 4]);
/// assert!(QuantBytes::new(file, 4..9).is_err()); // past the end: a typed error
/// ```
#[derive(Clone)]
pub struct QuantBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl QuantBytes {
    /// The bytes `range` of `owner`; an error when the range is reversed or ends past the
    /// owner's length.
    pub fn new(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        range: Range<usize>,
    ) -> Result<Self, QuantError> {
        let len = (*owner).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(QuantError::RangeOutOfBounds {
                start: range.start,
                end: range.end,
                len,
            });
        }
        Ok(Self { owner, range })
    }

    /// Owned bytes.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let range = 0..v.len();
        Self {
            owner: Arc::new(v),
            range,
        }
    }

    /// The bytes.
    ///
    /// # Panics
    /// Only if the owner shrank after [`new`](Self::new) checked the range (see the type's
    /// documentation).
    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }

    /// The range of the owner's bytes these are.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }
}

impl AsRef<[u8]> for QuantBytes {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for QuantBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QuantBytes({} bytes at {:?})", self.len(), self.range)
    }
}
