//! A small TensorBoard event-file writer and reader of our own (no panicking paths).
//!
//! An event file is a sequence of TFRecords: `u64` little-endian length, the masked CRC32C of
//! those 8 bytes, the data, the masked CRC32C of the data (`mask(c) = ((c >> 15) | (c << 17))
//! + 0xa282ead8`, wrapping). Each record holds an `Event` protobuf, encoded by hand:
//!
//! ```text
//! Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//! Summary { repeated Value value = 1; }
//! Value   { string tag = 1; float simple_value = 2; }
//! ```
//!
//! The first event of a file carries `file_version: "brain.Event:2"`.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The `file_version` of the first event.
pub const FILE_VERSION: &str = "brain.Event:2";

const MASK_DELTA: u32 = 0xa282_ead8;

/// TFRecord's masked CRC32C.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    // ((crc >> 15) | (crc << 17)) + MASK_DELTA.
    crc.rotate_right(15).wrapping_add(MASK_DELTA)
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    let raw = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

// Protobuf encoding.

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn encode_event(wall_time: f64, step: Option<i64>, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put_key(&mut out, 1, 1);
    out.extend_from_slice(&wall_time.to_le_bytes());
    if let Some(step) = step {
        put_key(&mut out, 2, 0);
        put_varint(&mut out, step as u64);
    }
    body(&mut out);
    out
}

fn encode_scalar(wall_time: f64, tag: &str, value: f32, step: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(tag.len() + 8);
    put_bytes(&mut v, 1, tag.as_bytes());
    put_key(&mut v, 2, 5);
    v.extend_from_slice(&value.to_le_bytes());
    let mut summary = Vec::with_capacity(v.len() + 2);
    put_bytes(&mut summary, 1, &v);
    encode_event(wall_time, Some(step), |out| put_bytes(out, 5, &summary))
}

/// Writes scalars to a TensorBoard event file.
#[derive(Debug)]
pub struct EventWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Create `dir` if needed and a new event file in it,
    /// `events.out.tfevents.<unix seconds>.<hostname>.burn-peft` (with `.1`, `.2`, … appended
    /// if that name is taken), and write the file-version event.
    pub fn new(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let base = format!("events.out.tfevents.{secs}.{}.burn-peft", hostname());
        let mut n = 0u32;
        let (file, path) = loop {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}.{n}")
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e),
            }
        };
        let mut w = Self {
            out: BufWriter::new(file),
            path,
        };
        let event = encode_event(wall_time(), None, |out| {
            put_bytes(out, 3, FILE_VERSION.as_bytes())
        });
        w.record(&event)?;
        w.flush()?;
        Ok(w)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc(data).to_le_bytes())
    }

    /// Write one scalar (`simple_value`) at `step`, then flush.
    pub fn scalar(&mut self, tag: &str, value: f32, step: i64) -> io::Result<()> {
        let event = encode_scalar(wall_time(), tag, value, step);
        self.record(&event)?;
        self.flush()
    }

    /// Flush buffered records to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// One scalar value of an event.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalarValue {
    /// The tag (`train/loss`, say).
    pub tag: String,
    /// The value.
    pub value: f32,
}

/// One decoded event.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Seconds since the Unix epoch.
    pub wall_time: f64,
    /// The global step (0 when absent).
    pub step: i64,
    /// The file version, on the first event of a file.
    pub file_version: Option<String>,
    /// The scalar (`simple_value`) values of the event's summary; other kinds are skipped.
    pub scalars: Vec<ScalarValue>,
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A protobuf reader over one message.
struct Proto<'a> {
    buf: &'a [u8],
}

impl<'a> Proto<'a> {
    fn varint(&mut self) -> io::Result<u64> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let (&b, rest) = self
                .buf
                .split_first()
                .ok_or_else(|| invalid("truncated varint"))?;
            self.buf = rest;
            if shift == 63 && b > 1 {
                return Err(invalid("varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(invalid("varint too long"))
    }

    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if n > self.buf.len() {
            return Err(invalid("truncated protobuf field"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    /// The next `(field, value)`, or `None` at the end.
    fn next(&mut self) -> io::Result<Option<(u64, Field<'a>)>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => Field::Fixed64(self.take(8)?.try_into().expect("8 bytes")),
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| invalid("length too large"))?;
                Field::Bytes(self.take(n)?)
            }
            5 => Field::Fixed32(self.take(4)?.try_into().expect("4 bytes")),
            w => return Err(invalid(format!("unsupported protobuf wire type {w}"))),
        };
        Ok(Some((field, value)))
    }
}

enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn utf8(bytes: &[u8]) -> io::Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| invalid("string field is not UTF-8"))
}

fn decode_value(buf: &[u8]) -> io::Result<Option<ScalarValue>> {
    let mut p = Proto { buf };
    let (mut tag, mut value) = (String::new(), None);
    while let Some((field, v)) = p.next()? {
        match (field, v) {
            (1, Field::Bytes(b)) => tag = utf8(b)?,
            (2, Field::Fixed32(b)) => value = Some(f32::from_le_bytes(b)),
            _ => {}
        }
    }
    Ok(value.map(|value| ScalarValue { tag, value }))
}

fn decode_event(buf: &[u8]) -> io::Result<Record> {
    let mut p = Proto { buf };
    let mut r = Record {
        wall_time: 0.0,
        step: 0,
        file_version: None,
        scalars: Vec::new(),
    };
    while let Some((field, v)) = p.next()? {
        match (field, v) {
            (1, Field::Fixed64(b)) => r.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(s)) => r.step = s as i64,
            (3, Field::Bytes(b)) => r.file_version = Some(utf8(b)?),
            (5, Field::Bytes(summary)) => {
                let mut s = Proto { buf: summary };
                while let Some((field, v)) = s.next()? {
                    if let (1, Field::Bytes(value)) = (field, v) {
                        r.scalars.extend(decode_value(value)?);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(r)
}

/// Read an event file, checking the framing and both CRCs of every record.
///
/// Errors: `UnexpectedEof` for a truncated record, `InvalidData` for a CRC mismatch or a
/// malformed protobuf.
pub fn read_events(path: impl AsRef<Path>) -> io::Result<Vec<Record>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path)?;
    let mut rest = bytes.as_slice();
    let mut records = Vec::new();
    let at =
        |offset: usize, what: &str| format!("{}: record at byte {offset}: {what}", path.display());
    while !rest.is_empty() {
        let offset = bytes.len() - rest.len();
        let eof = |what: &str| io::Error::new(io::ErrorKind::UnexpectedEof, at(offset, what));
        if rest.len() < 12 {
            return Err(eof("truncated header"));
        }
        let (len_bytes, tail) = rest.split_at(8);
        let (crc_bytes, tail) = tail.split_at(4);
        let crc = u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes"));
        if crc != masked_crc(len_bytes) {
            return Err(invalid(at(offset, "length CRC mismatch")));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let len = usize::try_from(len)
            .ok()
            .filter(|&n| n <= tail.len().saturating_sub(4))
            .ok_or_else(|| eof("truncated data"))?;
        let (data, tail) = tail.split_at(len);
        let (crc_bytes, tail) = tail.split_at(4);
        let crc = u32::from_le_bytes(crc_bytes.try_into().expect("4 bytes"));
        if crc != masked_crc(data) {
            return Err(invalid(at(offset, "data CRC mismatch")));
        }
        records.push(decode_event(data).map_err(|e| invalid(at(offset, &e.to_string())))?);
        rest = tail;
    }
    Ok(records)
}

/// The scalars of an event file as `(tag, value, step)`, in file order.
pub fn read_scalars(path: impl AsRef<Path>) -> io::Result<Vec<(String, f32, i64)>> {
    Ok(read_events(path)?
        .into_iter()
        .flat_map(|r| {
            let step = r.step;
            r.scalars.into_iter().map(move |s| (s.tag, s.value, step))
        })
        .collect())
}

/// The event files (names containing `tfevents`) directly in `dir`, sorted by name.
pub fn event_files(dir: impl AsRef<Path>) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() && entry.file_name().to_string_lossy().contains("tfevents")
        {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // The CRC32C check value of "123456789" is 0xe3069283.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // Masked by hand (Python): ((c >> 15) | (c << 17)) + 0xa282ead8 mod 2^32.
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn write_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::new(dir.path().join("logs")).unwrap();
        w.scalar("loss", 2.5, 1).unwrap();
        w.scalar("loss", 1.25, 2).unwrap();
        w.scalar("eval/accuracy", 0.75, 1_000_000_000_000).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        assert!(name.ends_with(".burn-peft"), "{name}");
        assert_eq!(
            event_files(dir.path().join("logs")).unwrap(),
            vec![path.clone()]
        );

        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].file_version.as_deref(), Some(FILE_VERSION));
        assert!(events[0].wall_time > 1.6e9);
        assert!(events[0].scalars.is_empty());
        assert_eq!(
            read_scalars(&path).unwrap(),
            vec![
                ("loss".to_string(), 2.5, 1),
                ("loss".to_string(), 1.25, 2),
                ("eval/accuracy".to_string(), 0.75, 1_000_000_000_000),
            ]
        );

        // Every record's framing is as specified.
        let bytes = std::fs::read(&path).unwrap();
        let mut at = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(crc, masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc(data));
            at += 16 + len;
        }
        assert_eq!(at, bytes.len());

        // A second writer in the same second gets its own file.
        let w2 = EventWriter::new(dir.path().join("logs")).unwrap();
        assert_ne!(w2.path(), path);
    }

    #[test]
    fn scalar_event_bytes() {
        // wall_time 1.0, step 3, tag "a", value 1.0: hand-assembled protobuf.
        let got = encode_scalar(1.0, "a", 1.0, 3);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.0f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 3, 0x2a, 10, 0x0a, 8, 0x0a, 1, b'a', 0x15]);
        want.extend_from_slice(&1.0f32.to_le_bytes());
        assert_eq!(got, want);
        // Negative steps are ten-byte varints and decode back.
        let r = decode_event(&encode_scalar(0.0, "x", -1.5, -7)).unwrap();
        assert_eq!((r.step, r.scalars[0].value), (-7, -1.5));
    }

    #[test]
    fn corruption_and_truncation_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::new(dir.path()).unwrap();
        w.scalar("loss", 0.5, 1).unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        let good = std::fs::read(&path).unwrap();
        let first_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let second = 16 + first_len;

        // One flipped byte in the data of the second record.
        let mut bad = good.clone();
        bad[second + 12 + 3] ^= 0x20;
        std::fs::write(&path, &bad).unwrap();
        let err = read_events(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("data CRC mismatch"), "{err}");

        // One flipped byte in a length.
        let mut bad = good.clone();
        bad[second] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let err = read_events(&path).unwrap_err();
        assert!(err.to_string().contains("length CRC mismatch"), "{err}");

        // Truncated in the data, and in the header.
        for cut in [good.len() - 3, second + 5] {
            std::fs::write(&path, &good[..cut]).unwrap();
            let err = read_events(&path).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        }

        std::fs::write(&path, &good).unwrap();
        assert_eq!(read_events(&path).unwrap().len(), 2);
    }
}
