//! The storage formats: GGML type ids, block geometry and names.
//!
//! Block sizes and byte counts are gguf-py's `GGML_QUANT_SIZES` (`gguf/constants.py`), the same
//! as the `ggml_type_traits` table in ggml.c; the type ids are gguf-py's `GGMLQuantizationType`
//! (`enum ggml_type` in ggml.h). `QK_K = 256` (ggml's default super-block).

/// Elements per K-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = 256;

/// Elements per NF4 block (bitsandbytes' default `blocksize` for 4-bit quantization).
pub const NF4_BLOCK: usize = 64;

/// A storage format of a frozen weight matrix: plain floats, one of llama.cpp's block
/// quantizations, or bitsandbytes' NF4 (QLoRA).
///
/// ```
/// use peft_ops::quant::QuantFormat;
///
/// let f = QuantFormat::from_ggml_type(3).unwrap();
/// assert_eq!(f, QuantFormat::Q4_1);
/// assert_eq!((f.name(), f.block_size(), f.block_bytes()), ("Q4_1", 32, 20));
/// assert_eq!(f.row_bytes(576), Some(18 * 20));
/// assert_eq!(f.row_bytes(100), None); // not a whole number of blocks
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QuantFormat {
    /// IEEE `f32`, 4 bytes per value.
    F32,
    /// IEEE `f16`, 2 bytes per value.
    F16,
    /// bfloat16 (the high half of an `f32`), 2 bytes per value.
    BF16,
    /// 32 values: an `f16` scale `d` and 4-bit `q`; `x = d·(q - 8)`.
    Q4_0,
    /// 32 values: `f16` scale `d` and minimum `m`, 4-bit `q`; `x = d·q + m`.
    Q4_1,
    /// 32 values: `f16` scale `d`, 5-bit `q` (4 low bits packed, the fifth in a `u32`);
    /// `x = d·(q - 16)`.
    Q5_0,
    /// 32 values: `f16` `d` and `m`, 5-bit `q`; `x = d·q + m`.
    Q5_1,
    /// 32 values: an `f16` scale `d` and `i8` `q`; `x = d·q`.
    Q8_0,
    /// 256 values in 16 groups: 2-bit `q`, 4-bit group scales and minimums, `f16` `d`, `dmin`.
    Q2_K,
    /// 256 values in 16 groups: 3-bit `q` (2 low bits + a high-bit mask), 6-bit signed group
    /// scales, an `f16` `d`.
    Q3_K,
    /// 256 values in 8 groups: 4-bit `q`, 6-bit group scales and minimums, `f16` `d`, `dmin`.
    Q4_K,
    /// 256 values in 8 groups: 5-bit `q`, 6-bit group scales and minimums, `f16` `d`, `dmin`.
    Q5_K,
    /// 256 values in 16 groups: 6-bit `q`, `i8` group scales, an `f16` `d`.
    Q6_K,
    /// bitsandbytes' NormalFloat4 (QLoRA): 64 values, an `f32` absmax and 4-bit codebook
    /// indices (see [`crate::quant::nf4`]).
    Nf4,
}

impl QuantFormat {
    /// Every format, in declaration order.
    pub const ALL: [QuantFormat; 14] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Nf4,
    ];

    /// The format of GGML type id `id` (gguf-py `GGMLQuantizationType`), `None` for ids that
    /// are unknown or not supported here (`Q8_1`, `Q8_K`, the `IQ*` and ternary types, integer
    /// types, ...).
    pub fn from_ggml_type(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// The GGML type id of the format (`None` for NF4, which GGUF does not have).
    pub fn ggml_type(self) -> Option<u32> {
        Some(match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::BF16 => 30,
            Self::Nf4 => return None,
        })
    }

    /// The format's name as llama.cpp spells it (`"Q4_1"`, `"BF16"`), `"NF4"` for NF4.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2_K => "Q2_K",
            Self::Q3_K => "Q3_K",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
            Self::Nf4 => "NF4",
        }
    }

    /// Values per block: 1 for the float formats, 32 for the legacy quants, [`QK_K`] (256) for
    /// the K-quants, [`NF4_BLOCK`] (64) for NF4.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K => QK_K,
            Self::Nf4 => NF4_BLOCK,
        }
    }

    /// Bytes per block (gguf-py `GGML_QUANT_SIZES`; NF4: a 4-byte `f32` absmax and 32 bytes of
    /// codes).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 2 + 16,
            Self::Q4_1 => 2 + 2 + 16,
            Self::Q5_0 => 2 + 4 + 16,
            Self::Q5_1 => 2 + 2 + 4 + 16,
            Self::Q8_0 => 2 + 32,
            Self::Q2_K => 2 + 2 + QK_K / 16 + QK_K / 4,
            Self::Q3_K => 2 + QK_K / 4 + QK_K / 8 + 12,
            Self::Q4_K => 2 + 2 + QK_K / 2 + 12,
            Self::Q5_K => 2 + 2 + QK_K / 2 + QK_K / 8 + 12,
            Self::Q6_K => 2 + QK_K / 2 + QK_K / 4 + QK_K / 16,
            Self::Nf4 => 4 + NF4_BLOCK / 2,
        }
    }

    /// Bytes of a row of `cols` values: `None` when `cols` is not a multiple of
    /// [`block_size`](Self::block_size) or the count overflows `usize`.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        let bs = self.block_size();
        if !cols.is_multiple_of(bs) {
            return None;
        }
        (cols / bs).checked_mul(self.block_bytes())
    }

    /// Whether [`QuantMatrix::quantize`](crate::quant::QuantMatrix::quantize) supports the
    /// format (every format but the K-quants, which gguf-py only dequantizes too).
    pub fn can_quantize(self) -> bool {
        !matches!(
            self,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K
        )
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuantFormat {
    type Err = crate::quant::QuantError;

    /// A format by [`name`](QuantFormat::name), case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| crate::quant::QuantError::UnknownFormatName(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for f in QuantFormat::ALL {
            match f.ggml_type() {
                Some(id) => assert_eq!(QuantFormat::from_ggml_type(id), Some(f)),
                None => assert_eq!(f, QuantFormat::Nf4),
            }
            assert_eq!(f.name().parse::<QuantFormat>().unwrap(), f);
        }
        for id in [4, 5, 9, 15, 16, 20, 24, 28, 34, 39, 41, 1000, u32::MAX] {
            assert_eq!(QuantFormat::from_ggml_type(id), None, "id {id}");
        }
    }

    #[test]
    fn row_bytes_is_checked() {
        assert_eq!(QuantFormat::Q6_K.row_bytes(512), Some(420));
        assert_eq!(QuantFormat::Q6_K.row_bytes(511), None);
        assert_eq!(QuantFormat::F32.row_bytes(usize::MAX), None);
        assert_eq!(QuantFormat::Q8_0.row_bytes(0), Some(0));
    }
}
