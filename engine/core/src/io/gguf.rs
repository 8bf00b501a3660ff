//! llama.cpp's GGUF files: the header, metadata and tensor directory, read from a memory map,
//! and block dequantization of the tensor types.
//!
//! Layout (little-endian): `GGUF`, version (2 or 3), tensor count, metadata count, the metadata
//! key/values, the tensor infos (name, dims, type, offset), then the tensor data, aligned to
//! `general.alignment` (32 by default).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use memmap2::Mmap;

use crate::io::blocks::{self, DType};

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

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: the first dimension is the contiguous one.
    pub dims: Vec<u64>,
    pub kind: DType,
    /// Byte offset of the data within the file.
    pub(crate) start: usize,
    pub(crate) len: usize,
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
    pub(crate) map: Arc<Mmap>,
}

impl Gguf {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = crate::io::open_regular_file(path)?;
        // SAFETY: the map is read-only; a file changed underneath is the caller's problem, as
        // with every memory-mapped checkpoint.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        Self::parse(Arc::new(map))
            .with_context(|| format!("{} is not a readable GGUF file", path.display()))
    }

    fn parse(map: Arc<Mmap>) -> anyhow::Result<Self> {
        let mut r = Reader {
            bytes: &map,
            at: 0,
            elements: MAX_ARRAY_ELEMENTS,
        };
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
            let value = r
                .value(kind, 0)
                .with_context(|| format!("metadata `{key}`"))?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::new();
        let mut names = std::collections::HashSet::new();
        for _ in 0..tensor_count {
            let name = r.string()?;
            let n_dims = r.u32()?;
            if n_dims > 8 {
                bail!("tensor `{name}` claims {n_dims} dimensions");
            }
            let dims = (0..n_dims)
                .map(|_| r.u64())
                .collect::<anyhow::Result<Vec<_>>>()?;
            let kind = {
                let id = r.u32()?;
                DType::from_ggml(id).with_context(|| {
                    format!("tensor `{name}`: GGML tensor type {id} is not supported")
                })?
            };
            let offset = r.u64()?;
            if !names.insert(name.clone()) {
                bail!("tensor `{name}` is listed twice");
            }
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
            let (per_block, block_bytes) = (kind.block().0 as u64, kind.block().1 as u64);
            // Blocks run along the contiguous first dimension: each row is whole blocks.
            if dims.first().copied().unwrap_or(1) % per_block != 0 {
                bail!("tensor `{name}`: rows of dims {dims:?} do not fill whole {kind:?} blocks");
            }
            let len = (dims.iter())
                .try_fold(1u64, |n, d| n.checked_mul(*d))
                .and_then(|elements| (elements / per_block).checked_mul(block_bytes))
                .with_context(|| format!("tensor `{name}`: dims {dims:?} are too large"))?;
            // Saturated, a corrupt offset lands past the end instead of wrapping around.
            let start = (data as u64).saturating_add(offset);
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
        blocks::dequantize(tensor.kind, self.data(tensor), &mut out);
        out
    }
}

/// How deep metadata arrays may nest (llama.cpp writes arrays of scalars and strings only).
const MAX_ARRAY_DEPTH: usize = 4;

/// Metadata array elements a file may hold in all: each takes tens of bytes in memory, and the
/// largest vocabularies hold a few hundred thousand tokens, scores, types and merges.
const MAX_ARRAY_ELEMENTS: u64 = 1 << 23;

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// Array elements still allowed.
    elements: u64,
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

    /// A value of type `kind`, inside `depth` arrays.
    fn value(&mut self, kind: u32, depth: usize) -> anyhow::Result<Value> {
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
                // Nesting is bounded, or a file of nested array headers overflows the stack.
                if depth >= MAX_ARRAY_DEPTH {
                    bail!("arrays nest more than {MAX_ARRAY_DEPTH} deep");
                }
                let kind = self.u32()?;
                let count = self.u64()?;
                // Every element takes at least a byte: a count beyond the file is corrupt.
                if count > (self.bytes.len() - self.at) as u64 || count > self.elements {
                    bail!("an array claims {count} elements");
                }
                self.elements -= count;
                Value::Array(
                    (0..count)
                        .map(|_| self.value(kind, depth + 1))
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

impl Gguf {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn string(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// A numeric metadata value as f64, whatever its stored width.
    pub fn number(&self, key: &str) -> Option<f64> {
        Some(match self.get(key)? {
            Value::U8(v) => *v as f64,
            Value::I8(v) => *v as f64,
            Value::U16(v) => *v as f64,
            Value::I16(v) => *v as f64,
            Value::U32(v) => *v as f64,
            Value::I32(v) => *v as f64,
            Value::U64(v) => *v as f64,
            Value::I64(v) => *v as f64,
            Value::F32(v) => *v as f64,
            Value::F64(v) => *v,
            Value::Bool(_) | Value::String(_) | Value::Array(_) => return None,
        })
    }
}
