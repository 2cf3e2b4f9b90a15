//! Every storage format against its reference implementation, bit for bit: gguf-py's
//! `gguf.quants.dequantize` / `quantize` for the GGUF formats and bitsandbytes'
//! `quantize_4bit` / `dequantize_4bit` for NF4 (fixtures made by
//! tests/fixtures/gen/quant_formats.py, described there).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use peft_ops::quant::{QuantBytes, QuantFormat, QuantMatrix, nf4};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/quant")
}

fn read(name: &str) -> Vec<u8> {
    let path = fixtures().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_f32(name: &str) -> Vec<f32> {
    read(name)
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

struct Case {
    name: String,
    format: QuantFormat,
    rows: usize,
    cols: usize,
    quantized: bool,
}

fn cases() -> Vec<Case> {
    String::from_utf8(read("manifest.txt"))
        .unwrap()
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 5, "manifest line {line:?}");
            Case {
                name: f[0].to_string(),
                format: f[1].parse().unwrap(),
                rows: f[2].parse().unwrap(),
                cols: f[3].parse().unwrap(),
                quantized: f[4] == "quant",
            }
        })
        .collect()
}

/// Index and values of the first element whose bits differ.
fn first_difference(got: &[f32], want: &[f32]) -> Option<(usize, f32, f32)> {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .enumerate()
        .find(|(_, (g, w))| g.to_bits() != w.to_bits())
        .map(|(i, (g, w))| (i, *g, *w))
}

#[test]
fn dequantization_is_bit_exact_for_every_format() {
    let cases = cases();
    let mut seen = std::collections::BTreeSet::new();
    for case in &cases {
        let bytes = read(&format!("{}.bin", case.name));
        let want = read_f32(&format!("{}.f32", case.name));
        let m = QuantMatrix::new(
            case.format,
            case.rows,
            case.cols,
            QuantBytes::from_vec(bytes.clone()),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(m.stored_bytes(), bytes.len());
        if let Some((i, g, w)) = first_difference(&m.dequantize(), &want) {
            panic!("{}: element {i} is {g:e}, the reference {w:e}", case.name);
        }
        // Row by row, from a slice of a larger shared buffer (as a GGUF reader gives it).
        let mut file = vec![0xAB; 7];
        file.extend_from_slice(&bytes);
        file.extend_from_slice(&[0xCD; 5]);
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = Arc::new(file);
        let shared = QuantBytes::new(owner, 7..7 + bytes.len()).unwrap();
        let m = QuantMatrix::new(case.format, case.rows, case.cols, shared).unwrap();
        let mut row = vec![0f32; case.cols];
        for r in 0..case.rows {
            m.dequantize_row(r, &mut row);
            let want_row = &want[r * case.cols..(r + 1) * case.cols];
            assert!(
                first_difference(&row, want_row).is_none(),
                "{} row {r}",
                case.name
            );
        }
        seen.insert(case.format.name());
    }
    for f in QuantFormat::ALL {
        if f != QuantFormat::F32 {
            assert!(seen.contains(f.name()), "no fixture for {f}");
        }
    }
}

#[test]
fn quantization_is_bit_exact_where_the_references_quantize() {
    let mut n = 0;
    for case in cases().iter().filter(|c| c.quantized) {
        let src = read_f32(&format!("{}.src.f32", case.name));
        let want = read(&format!("{}.bin", case.name));
        let m = QuantMatrix::quantize(case.format, &src, case.rows, case.cols)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let got = m.bytes().as_slice();
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            let bb = case.format.block_bytes();
            panic!(
                "{}: byte {i} (block {}, offset {}) is {:#04x}, the reference {:#04x}",
                case.name,
                i / bb,
                i % bb,
                got[i],
                want[i]
            );
        }
        assert_eq!(got.len(), want.len(), "{}", case.name);
        // And back: the reference's dequantization of its own quantization.
        let back = read_f32(&format!("{}.f32", case.name));
        assert!(
            first_difference(&m.dequantize(), &back).is_none(),
            "{}",
            case.name
        );
        n += 1;
    }
    // F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (gguf-py) and NF4 (bitsandbytes).
    assert_eq!(n, 8);
}

#[test]
fn nf4_codebook_and_layout_are_bitsandbytes() {
    let code = read_f32("nf4_code.f32");
    let ours: Vec<u32> = nf4::NF4_CODE.iter().map(|c| c.to_bits()).collect();
    let theirs: Vec<u32> = code.iter().map(|c| c.to_bits()).collect();
    assert_eq!(ours, theirs);

    // bitsandbytes' own arrays (packed codes, absmax) give the same matrix.
    let packed = read("nf4_quant.bnb_packed");
    let absmax = read_f32("nf4_quant.bnb_absmax.f32");
    let case = cases().into_iter().find(|c| c.name == "nf4_quant").unwrap();
    let m = QuantMatrix::from_bnb_nf4(&packed, &absmax, case.rows, case.cols).unwrap();
    assert_eq!(m.bytes().as_slice(), &read("nf4_quant.bin")[..]);
    let (p2, a2) = m.to_bnb_nf4().unwrap();
    assert_eq!(p2, packed);
    assert_eq!(
        a2.iter().map(|a| a.to_bits()).collect::<Vec<_>>(),
        absmax.iter().map(|a| a.to_bits()).collect::<Vec<_>>()
    );
    // Mismatched arrays are an error, not a panic.
    assert!(QuantMatrix::from_bnb_nf4(&packed[1..], &absmax, case.rows, case.cols).is_err());
    assert!(QuantMatrix::from_bnb_nf4(&packed, &absmax[1..], case.rows, case.cols).is_err());
    assert!(QuantMatrix::from_bnb_nf4(&packed, &absmax, case.rows, 100).is_err());
    let other = QuantMatrix::quantize(QuantFormat::Q8_0, &[0.0; 32], 1, 32).unwrap();
    assert!(other.to_bnb_nf4().is_none());
}
