//! Checkpoint weights: safetensors files (single or sharded) mapped into memory.
//!
//! Tensors stay in the mapped file in their stored dtype; kernels read them in place, so decode
//! never copies weights. Only a tensor whose data is misaligned for its element type is copied.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::io::blocks;
pub use crate::io::blocks::DType;

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("no weights found in {0}: expected model.safetensors or model.safetensors.index.json")]
    NoWeights(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] crate::io::FileError),
    #[error("{path} is not a valid safetensors file (truncated or corrupt?): {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: malformed shard index: {reason}")]
    BadIndex { path: PathBuf, reason: String },
    #[error("tensor `{0}` is missing from the checkpoint")]
    Missing(String),
    #[error("tensor `{name}` has shape {found:?}, but the config implies {expected:?}")]
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(
        "tensor `{name}` has dtype {dtype}, which vibee cannot use as a weight (f32, f16, bf16, or GGUF's quantized types)"
    )]
    Dtype { name: String, dtype: String },
}

#[derive(Clone)]
pub(crate) enum Storage {
    Mapped(Arc<Mmap>),
    /// u64 words keep any element type aligned.
    Owned(Arc<Vec<u64>>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(map) => map,
            Storage::Owned(words) => {
                // SAFETY: reinterpreting initialised u64 words as bytes is always valid.
                unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() * 8) }
            }
        }
    }
}

/// An aligned private copy of `bytes`.
pub(crate) fn owned(bytes: &[u8]) -> Storage {
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: the destination holds at least `bytes.len()` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr().cast::<u8>(), bytes.len())
    };
    Storage::Owned(Arc::new(words))
}

/// One weight tensor, viewed in place.
#[derive(Clone)]
pub struct Weight {
    storage: Storage,
    start: usize,
    len: usize,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// A weight's elements in their stored type.
#[derive(Clone, Copy)]
pub enum WeightData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// Quantized blocks of the weight's dtype, row after row.
    Blocks(&'a [u8]),
}

impl Weight {
    fn new(storage: Storage, start: usize, len: usize, dtype: DType, shape: Vec<usize>) -> Self {
        let aligned =
            (storage.bytes()[start..].as_ptr() as usize).is_multiple_of(dtype.alignment());
        let (storage, start) = if aligned {
            (storage, start)
        } else {
            (owned(&storage.bytes()[start..start + len]), 0)
        };
        Self {
            storage,
            start,
            len,
            dtype,
            shape,
        }
    }

    /// A weight from raw little-endian element bytes (tensors built in memory).
    pub fn from_bytes(bytes: Vec<u8>, dtype: DType, shape: Vec<usize>) -> Self {
        let len = bytes.len();
        assert_eq!(
            Some(len),
            dtype.bytes_for(shape.iter().product()),
            "weight bytes do not match shape"
        );
        Self::new(owned(&bytes), 0, len, dtype, shape)
    }

    pub fn from_f32(values: &[f32], shape: Vec<usize>) -> Self {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::from_bytes(bytes, DType::F32, shape)
    }

    pub fn data(&self) -> WeightData<'_> {
        let bytes = &self.storage.bytes()[self.start..self.start + self.len];
        // SAFETY: alignment was checked in `new` and every bit pattern is a valid element.
        unsafe {
            match self.dtype {
                DType::F32 => WeightData::F32(std::slice::from_raw_parts(
                    bytes.as_ptr().cast(),
                    self.len / 4,
                )),
                DType::F16 => WeightData::F16(std::slice::from_raw_parts(
                    bytes.as_ptr().cast(),
                    self.len / 2,
                )),
                DType::BF16 => WeightData::BF16(std::slice::from_raw_parts(
                    bytes.as_ptr().cast(),
                    self.len / 2,
                )),
                _ => WeightData::Blocks(bytes),
            }
        }
    }

    /// A 2-D weight with rows and columns swapped, as an owned copy in the same dtype (for
    /// checkpoints that store `[in, out]`, like GPT-2's Conv1D; done once at load). Quantized
    /// blocks run along rows and cannot be transposed.
    pub fn transposed(&self) -> anyhow::Result<Weight> {
        if self.dtype.is_quantized() {
            anyhow::bail!("a {} weight cannot be transposed", self.dtype);
        }
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let size = self.dtype.block().1;
        let bytes = &self.storage.bytes()[self.start..self.start + self.len];
        let mut out = vec![0u8; self.len];
        for r in 0..rows {
            for c in 0..cols {
                let (from, to) = ((r * cols + c) * size, (c * rows + r) * size);
                out[to..to + size].copy_from_slice(&bytes[from..from + size]);
            }
        }
        Ok(Weight::from_bytes(out, self.dtype, vec![cols, rows]))
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> usize {
        self.len
    }

    /// Maps a mapped weight's pages now (Linux's `MADV_POPULATE_READ`), as llama.cpp's
    /// `MAP_POPULATE` does: a weight read in place otherwise makes the first request pay a page
    /// fault per 4 KB, and the disk reads of pages not in the page cache (a TinyLlama-shape F16
    /// prefill ran at 27–35 tok/s that way, 78–86 once its pages were in). Only a hint: where
    /// the kernel lacks it, pages fault in on first use as before.
    pub fn populate(&self) {
        #[cfg(target_os = "linux")]
        if let Storage::Mapped(map) = &self.storage {
            let advice = memmap2::Advice::PopulateRead;
            if let Err(e) = map.advise_range(advice, self.start, self.len) {
                tracing::debug!("pages of a mapped weight left to fault in on first use: {e}");
            }
        }
    }

    /// Row `i` of a 2-D weight (or `out.len()` elements from element `i * out.len()`),
    /// converted to f32 into `out`.
    pub fn row_to_f32(&self, i: usize, out: &mut [f32]) {
        let cols = out.len();
        let range = i * cols..(i + 1) * cols;
        match self.data() {
            WeightData::Blocks(blocks) => {
                let row_bytes = self.dtype.bytes_for(cols).expect("rows are whole blocks");
                blocks::dequantize(self.dtype, &blocks[i * row_bytes..][..row_bytes], out)
            }
            WeightData::F32(w) => out.copy_from_slice(&w[range]),
            WeightData::F16(w) => {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&w[range], out)
            }
            WeightData::BF16(w) => {
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(&w[range], out)
            }
        }
    }

    /// The whole tensor as f32 (small tensors such as norm weights).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        self.row_to_f32(0, &mut out);
        out
    }
}

pub(crate) struct Entry {
    pub(crate) file: usize,
    pub(crate) start: usize,
    pub(crate) len: usize,
    pub(crate) dtype: Result<DType, String>,
    pub(crate) shape: Vec<usize>,
}

/// All tensors of a checkpoint directory, by name.
pub struct Weights {
    /// Mapped checkpoint files, and tensors vibee assembled from a file's parts.
    pub(crate) files: Vec<(PathBuf, Storage)>,
    pub(crate) entries: HashMap<String, Entry>,
    /// GGML writes a tensor without its trailing dimensions of 1 (`ggml_n_dims`: llama-quantize
    /// stores Qwen2-MoE's `[1, hidden]` shared-expert gate as `[hidden]`), so a GGUF tensor's
    /// shape matches without leading ones.
    pub(crate) ggml_shapes: bool,
}

impl Weights {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, WeightError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files = if index.exists() {
            shard_files(&index)?
                .into_iter()
                .map(|f| dir.join(f))
                .collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(WeightError::NoWeights(dir.to_path_buf()));
        };
        let mut weights = Self {
            files: Vec::new(),
            entries: HashMap::new(),
            ggml_shapes: false,
        };
        for path in files {
            weights.add_file(path)?;
        }
        Ok(weights)
    }

    fn add_file(&mut self, path: PathBuf) -> Result<(), WeightError> {
        let io = |source| WeightError::Io {
            path: path.clone(),
            source,
        };
        let file = crate::io::open_regular_file(&path)?;
        // SAFETY: the file is opened read-only; vibee does not support checkpoints that are
        // rewritten while a model is loaded from them.
        let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(io)?);
        let tensors = SafeTensors::deserialize(&map).map_err(|e| WeightError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let base = map.as_ptr() as usize;
        for (name, view) in tensors.tensors() {
            let dtype = match view.dtype() {
                Dtype::F32 => Ok(DType::F32),
                Dtype::F16 => Ok(DType::F16),
                Dtype::BF16 => Ok(DType::BF16),
                other => Err(format!("{other:?}")),
            };
            let entry = Entry {
                file: self.files.len(),
                start: view.data().as_ptr() as usize - base,
                len: view.data().len(),
                dtype,
                shape: view.shape().to_vec(),
            };
            self.entries.insert(name, entry);
        }
        self.files.push((path, Storage::Mapped(map)));
        Ok(())
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Whether any tensor's name starts with `prefix` (a layer's, say).
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.entries.keys().any(|name| name.starts_with(prefix))
    }

    /// The stored shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize], WeightError> {
        self.entries
            .get(name)
            .map(|e| e.shape.as_slice())
            .ok_or_else(|| WeightError::Missing(name.to_string()))
    }

    /// The bytes of the non-float tensor `name`, which must be stored as `dtype` (safetensors'
    /// name: `I32`, `U8`, `I64`), with its shape: the packed weights and metadata of
    /// quantized checkpoints.
    pub fn raw(&self, name: &str, dtype: &str) -> Result<(&[u8], &[usize]), WeightError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| WeightError::Missing(name.to_string()))?;
        let found = match &entry.dtype {
            Ok(dtype) => dtype.to_string(),
            Err(dtype) => dtype.clone(),
        };
        if found != dtype {
            return Err(WeightError::Dtype {
                name: name.to_string(),
                dtype: format!("{found} (expected {dtype})"),
            });
        }
        let bytes = &self.files[entry.file].1.bytes()[entry.start..entry.start + entry.len];
        Ok((bytes, &entry.shape))
    }

    /// The I32 tensor `name` (packed quantized weights of AutoAWQ/GPTQ checkpoints), copied,
    /// with its shape.
    pub fn int32(&self, name: &str) -> Result<(Vec<i32>, Vec<usize>), WeightError> {
        let (bytes, shape) = self.raw(name, "I32")?;
        let values = bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok((values, shape.to_vec()))
    }

    /// The tensor `name`, checked against the shape the config implies.
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<Weight, WeightError> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| WeightError::Missing(name.to_string()))?;
        let squeezed = |shape: &[usize]| {
            let ones = shape.iter().take_while(|d| **d == 1).count();
            shape[ones..].to_vec()
        };
        let same = entry.shape == expected
            || (self.ggml_shapes && squeezed(&entry.shape) == squeezed(expected));
        if !same {
            return Err(WeightError::Shape {
                name: name.to_string(),
                found: entry.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        let dtype = entry.dtype.clone().map_err(|dtype| WeightError::Dtype {
            name: name.to_string(),
            dtype,
        })?;
        let storage = self.files[entry.file].1.clone();
        Ok(Weight::new(
            storage,
            entry.start,
            entry.len,
            dtype,
            expected.to_vec(),
        ))
    }
}

fn shard_files(index: &Path) -> Result<Vec<String>, WeightError> {
    let bad = |reason: String| WeightError::BadIndex {
        path: index.to_path_buf(),
        reason,
    };
    let text = crate::io::read_regular_text(index, crate::io::SMALL_FILE)?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("file of `{tensor}` is not a string")))?;
        if file.contains('/') || file.contains('\\') {
            return Err(bad(format!(
                "shard `{file}` is not a file name in the model directory"
            )));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    files.sort();
    Ok(files)
}
