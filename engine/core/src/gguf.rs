//! llama.cpp's GGUF files: the header, metadata and tensor directory, read from a memory map,
//! and block dequantization of the tensor types.
//!
//! Layout (little-endian): `GGUF`, version (2 or 3), tensor count, metadata count, the metadata
//! key/values, the tensor infos (name, dims, type, offset), then the tensor data, aligned to
//! `general.alignment` (32 by default).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use half::{bf16, f16};
use memmap2::Mmap;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// The tensor types vibee reads, by their GGML numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

impl TensorType {
    fn from_ggml(id: u32) -> anyhow::Result<Self> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => bail!("GGML tensor type {other} is not supported"),
        })
    }

    /// Elements per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (256, 84),
            Self::Q3K => (256, 110),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: the first dimension is the contiguous one.
    pub dims: Vec<u64>,
    pub kind: TensorType,
    /// Byte offset of the data within the file.
    start: usize,
    len: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    map: Mmap,
}

impl Gguf {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only; a file changed underneath is the caller's problem, as
        // with every memory-mapped checkpoint.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        Self::parse(map).with_context(|| format!("{} is not a readable GGUF file", path.display()))
    }

    fn parse(map: Mmap) -> anyhow::Result<Self> {
        let mut r = Reader { bytes: &map, at: 0 };
        if r.take(4)? != b"GGUF" {
            bail!("it does not start with the GGUF magic");
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version} is not supported (2 and 3 are)");
        }
        let tensor_count = r.u64()?;
        let kv_count = r.u64()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = r.string()?;
            let kind = r.u32()?;
            let value = r.value(kind).with_context(|| format!("metadata `{key}`"))?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::new();
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 8 {
                bail!("tensor `{name}` claims {n_dims} dimensions");
            }
            let dims = (0..n_dims)
                .map(|_| r.u64())
                .collect::<anyhow::Result<Vec<_>>>()?;
            let kind =
                TensorType::from_ggml(r.u32()?).with_context(|| format!("tensor `{name}`"))?;
            let offset = r.u64()?;
            infos.push((name, dims, kind, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            Some(Value::U32(a)) if a.is_power_of_two() => *a as usize,
            None => 32,
            Some(other) => bail!("general.alignment is {other:?}, not a power of two"),
        };
        let data = r.at.div_ceil(alignment) * alignment;
        let mut tensors = Vec::new();
        for (name, dims, kind, offset) in infos {
            let elements = dims.iter().try_fold(1u64, |n, d| n.checked_mul(*d));
            let (per_block, block_bytes) = kind.block();
            let len = elements
                .filter(|n| n % per_block as u64 == 0)
                .map(|n| n / per_block as u64 * block_bytes as u64)
                .with_context(|| {
                    format!("tensor `{name}`: dims {dims:?} do not fill whole {kind:?} blocks")
                })?;
            let start = data as u64 + offset;
            if start
                .checked_add(len)
                .is_none_or(|end| end > map.len() as u64)
            {
                bail!(
                    "tensor `{name}` ends past the end of the file ({} bytes): truncated?",
                    map.len()
                );
            }
            tensors.push(TensorInfo {
                name,
                dims,
                kind,
                start: start as usize,
                len: len as usize,
            });
        }
        Ok(Self {
            version,
            metadata,
            tensors,
            map,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's raw bytes, as stored.
    pub fn data(&self, tensor: &TensorInfo) -> &[u8] {
        &self.map[tensor.start..tensor.start + tensor.len]
    }

    /// A tensor's values as f32, block by block.
    pub fn dequantize(&self, tensor: &TensorInfo) -> Vec<f32> {
        let mut out = vec![0.0; tensor.elements()];
        dequantize(tensor.kind, self.data(tensor), &mut out);
        out
    }
}

/// Dequantizes `data` of type `kind` into `out`, which holds exactly its elements.
pub fn dequantize(kind: TensorType, data: &[u8], out: &mut [f32]) {
    let (per_block, block_bytes) = kind.block();
    let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
    for (block, out) in data
        .chunks_exact(block_bytes)
        .zip(out.chunks_mut(per_block))
    {
        match kind {
            TensorType::F32 => out[0] = f32::from_le_bytes(block.try_into().expect("4 bytes")),
            TensorType::F16 => out[0] = half(block),
            TensorType::BF16 => out[0] = bf16::from_le_bytes([block[0], block[1]]).to_f32(),
            TensorType::Q8_0 => {
                let d = half(block);
                for (o, q) in out.iter_mut().zip(&block[2..]) {
                    *o = d * (*q as i8) as f32;
                }
            }
            TensorType::Q4_0 | TensorType::Q4_1 | TensorType::Q5_0 | TensorType::Q5_1 => {
                nibbles(kind, block, out, half)
            }
            TensorType::Q2K => {
                let (d, dmin) = (half(&block[80..]), half(&block[82..]));
                let (scales, qs) = (&block[..16], &block[16..80]);
                for (e, o) in out.iter_mut().enumerate() {
                    let (scale, (g, s, i)) = (scales[e / 16], split(e));
                    let q = ((qs[g * 32 + i] >> (2 * s)) & 3) as f32;
                    *o = d * (scale & 0xF) as f32 * q - dmin * (scale >> 4) as f32;
                }
            }
            TensorType::Q3K => {
                let (hmask, qs, scales) = (&block[..32], &block[32..96], &block[96..108]);
                let d = half(&block[108..]);
                for (e, o) in out.iter_mut().enumerate() {
                    let k = e / 16;
                    let low = (scales[k % 8] >> (4 * (k / 8))) & 0xF;
                    let high = (scales[8 + k % 4] >> (2 * (k / 4))) & 3;
                    let scale = (low | high << 4) as i8 as f32 - 32.0;
                    let (g, s, i) = split(e);
                    let low_bits = ((qs[g * 32 + i] >> (2 * s)) & 3) as i8;
                    let high_bit = ((hmask[i] >> (e / 32)) & 1) as i8;
                    *o = d * scale * (low_bits - ((high_bit ^ 1) << 2)) as f32;
                }
            }
            TensorType::Q4K | TensorType::Q5K => {
                let (d, dmin) = (half(block), half(&block[2..]));
                let (scale, min) = k_scales(&block[4..16]);
                let (qh, qs) = match kind {
                    TensorType::Q5K => (Some(&block[16..48]), &block[48..176]),
                    _ => (None, &block[16..144]),
                };
                for (e, o) in out.iter_mut().enumerate() {
                    let (j, i) = (e / 32, e % 32);
                    let low = (qs[j / 2 * 32 + i] >> (4 * (j % 2))) & 0xF;
                    let fifth = qh.map_or(0, |h| (h[i] >> j) & 1);
                    let q = (low | fifth << 4) as f32;
                    *o = d * scale[j] as f32 * q - dmin * min[j] as f32;
                }
            }
            TensorType::Q6K => {
                let (ql, qh, scales) = (&block[..128], &block[128..192], &block[192..208]);
                let d = half(&block[208..]);
                for (e, o) in out.iter_mut().enumerate() {
                    let (h, r, i) = split(e);
                    let low = (ql[h * 64 + (r % 2) * 32 + i] >> (4 * (r / 2))) & 0xF;
                    let high = (qh[h * 32 + i] >> (2 * r)) & 3;
                    let q = (low | high << 4) as i8 - 32;
                    *o = d * scales[e / 16] as i8 as f32 * q as f32;
                }
            }
        }
    }
}

/// The 4- and 5-bit types: element `j` of a block is the low nibble of byte `j`, element
/// `j + 16` its high nibble; the 5-bit types add bit `j` of a 32-bit mask as the fifth bit.
/// Symmetric types subtract the midpoint, the others add a per-block minimum.
fn nibbles(kind: TensorType, block: &[u8], out: &mut [f32], half: impl Fn(&[u8]) -> f32) {
    let d = half(block);
    let (min, high, quants, offset) = match kind {
        TensorType::Q4_0 => (None, None, &block[2..], 8.0),
        TensorType::Q4_1 => (Some(half(&block[2..])), None, &block[4..], 0.0),
        TensorType::Q5_0 => (None, Some(&block[2..6]), &block[6..], 16.0),
        _ => (
            Some(half(&block[2..])),
            Some(&block[4..8]),
            &block[8..],
            0.0,
        ),
    };
    let high = high.map_or(0, |h| u32::from_le_bytes(h.try_into().expect("4 bytes")));
    for (j, q) in quants.iter().enumerate() {
        for (k, nibble) in [(j, q & 0x0F), (j + 16, q >> 4)] {
            let fifth = ((high >> k) & 1) as u8;
            let value = (nibble | fifth << 4) as f32 - offset;
            out[k] = match min {
                Some(m) => d * value + m,
                None => d * value,
            };
        }
    }
}

/// Element `e` of a 256-element super-block as (half, row, column): the K-quants store two
/// halves of 128, each as four rows of 32 that share bytes at different bit positions.
fn split(e: usize) -> (usize, usize, usize) {
    (e / 128, e % 128 / 32, e % 32)
}

/// The eight 6-bit scales and minimums of a Q4_K/Q5_K super-block, packed in 12 bytes: the
/// first four of each in the low six bits of bytes 0–3 and 4–7, the last four split between
/// the nibbles of bytes 8–11 and the top two bits of bytes 0–7.
fn k_scales(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut scale, mut min) = ([0; 8], [0; 8]);
    for k in 0..4 {
        scale[k] = packed[k] & 0x3F;
        min[k] = packed[k + 4] & 0x3F;
        scale[k + 4] = (packed[k + 8] & 0x0F) | ((packed[k] >> 2) & 0x30);
        min[k + 4] = (packed[k + 8] >> 4) | ((packed[k + 4] >> 2) & 0x30);
    }
    (scale, min)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .with_context(|| {
                format!(
                    "it ends at byte {} inside its header (truncated?)",
                    self.bytes.len()
                )
            })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> anyhow::Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> anyhow::Result<String> {
        let len = self.u64()?;
        let bytes = self.take(usize::try_from(len).unwrap_or(usize::MAX))?;
        String::from_utf8(bytes.to_vec()).context("a string is not UTF-8")
    }

    fn value(&mut self, kind: u32) -> anyhow::Result<Value> {
        Ok(match kind {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                let kind = self.u32()?;
                let count = self.u64()?;
                // Every element takes at least a byte: a count beyond the file is corrupt.
                if count > (self.bytes.len() - self.at) as u64 {
                    bail!("an array claims {count} elements");
                }
                Value::Array(
                    (0..count)
                        .map(|_| self.value(kind))
                        .collect::<anyhow::Result<_>>()?,
                )
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => bail!("unknown metadata value type {other}"),
        })
    }
}
