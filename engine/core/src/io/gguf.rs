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

use crate::backend::quant;
use crate::config::{families, FfnKind, ModelConfig, QkvLayout};
use crate::io::weights::DType;

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
        quant::dequantize(tensor.kind, self.data(tensor), &mut out);
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

    /// The family vibee reads this file as.
    pub fn family(&self) -> Option<&'static families::Family> {
        let arch = self.string("general.architecture")?;
        // A count of 0 is how the converter writes a dense model that has the key.
        families::from_gguf(arch, |key| {
            self.number(&format!("{arch}.{key}"))
                .is_some_and(|n| n > 0.0)
        })
    }

    /// `general.architecture`, when vibee runs it.
    pub fn architecture(&self) -> anyhow::Result<&str> {
        let arch = self
            .string("general.architecture")
            .context("the file has no general.architecture")?;
        if self.family().is_none() {
            let known: Vec<_> = families::FAMILIES
                .iter()
                .filter_map(|f| Some(f.gguf.as_ref()?.architecture))
                .collect();
            bail!(
                "GGUF architecture `{arch}` is not supported yet (supported: {})",
                known.join(", ")
            );
        }
        Ok(arch)
    }

    /// The Hugging Face `config.json` equivalent of the file's metadata, which vibee's config
    /// parser then validates like any other.
    pub fn hf_config(&self) -> anyhow::Result<serde_json::Value> {
        let arch = self.architecture()?;
        let family = self.family().expect("checked");
        let form = family
            .gguf
            .as_ref()
            .expect("a family found by its GGUF form");
        let key = |name: &str| format!("{arch}.{name}");
        let required = |name: &str| {
            self.number(&key(name))
                .with_context(|| format!("the file has no {}", key(name)))
        };
        let heads = required("attention.head_count")?;
        let hidden = required("embedding_length")?;
        let head_dim = self
            .number(&key("attention.key_length"))
            .unwrap_or(hidden / heads);
        let vocab = match self.number(&key("vocab_size")) {
            Some(v) => v,
            None => match self.get("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens)) => tokens.len() as f64,
                _ => bail!("the file gives no vocabulary size"),
            },
        };
        let mut config = serde_json::json!({
            "model_type": family.model_type,
            "hidden_size": hidden,
            "intermediate_size": required("feed_forward_length")?,
            "num_hidden_layers": required("block_count")?,
            "num_attention_heads": heads,
            "num_key_value_heads": self.number(&key("attention.head_count_kv")).unwrap_or(heads),
            "head_dim": head_dim,
            "rms_norm_eps": match self.number(&key("attention.layer_norm_rms_epsilon")) {
                Some(eps) => eps,
                None => required("attention.layer_norm_epsilon")?,
            },
            "rope_theta": self.number(&key("rope.freq_base")).unwrap_or(10000.0),
            "max_position_embeddings": required("context_length")?,
            "vocab_size": vocab,
            "tie_word_embeddings": self.tensor("output.weight").is_none(),
        });
        for (part, field) in form.flags {
            config[*field] = self
                .tensor(&format!("blk.0.{part}.weight"))
                .is_some()
                .into();
        }
        for (name, field) in form.metadata {
            match (self.get(&key(name)), self.number(&key(name))) {
                (Some(Value::Bool(flag)), _) => config[*field] = (*flag).into(),
                // llama.cpp writes a window of 0 for none.
                (_, Some(0.0)) if *field == "sliding_window" => {}
                (_, Some(value)) => config[*field] = value.into(),
                _ => {}
            }
        }
        // llama.cpp turns the first `rope.dimension_count` dimensions of each head.
        let rotary = self
            .number(&key("rope.dimension_count"))
            .unwrap_or(head_dim);
        if rotary != head_dim {
            config["partial_rotary_factor"] = (rotary / head_dim).into();
        }
        for (name, field) in [
            ("tokenizer.ggml.bos_token_id", "bos_token_id"),
            ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ] {
            if let Some(id) = self.number(name) {
                config[field] = id.into();
            }
        }
        // llama.cpp's converter turns Llama 3's rope scaling into a divisor per frequency
        // (`rope_freqs`), the form transformers calls longrope's factors: the same divisors at
        // every length, with cos/sin unscaled.
        let per_frequency = |name: &str| -> anyhow::Result<Option<Vec<f32>>> {
            let Some(t) = self.tensor(name) else {
                return Ok(None);
            };
            if t.elements() as f64 * 2.0 != rotary || t.kind.is_quantized() {
                bail!(
                    "{name} must hold {} float values, one per frequency; it has {} {}",
                    rotary / 2.0,
                    t.elements(),
                    t.kind
                );
            }
            Ok(Some(self.dequantize(t)))
        };
        if let Some(factors) = per_frequency("rope_freqs.weight")? {
            if self
                .string(&key("rope.scaling.type"))
                .is_some_and(|t| t != "none")
            {
                bail!("the file scales rope twice: rope_freqs.weight and rope.scaling.type");
            }
            config["rope_scaling"] = serde_json::json!({
                "rope_type": "longrope",
                "short_factor": factors,
                "long_factor": factors,
                "original_max_position_embeddings": required("context_length")? as u64,
                "attention_factor": 1.0,
            });
        }
        // Phi-3's long-context scaling: one factor per frequency within the trained length and
        // one past it, cos/sin scaled by `rope.scaling.attn_factor`.
        if let (Some(long), Some(short)) = (
            per_frequency("rope_factors_long.weight")?,
            per_frequency("rope_factors_short.weight")?,
        ) {
            let original = required("rope.scaling.original_context_length")? as u64;
            config["rope_scaling"] = serde_json::json!({
                "rope_type": "longrope",
                "short_factor": short,
                "long_factor": long,
                "original_max_position_embeddings": original,
                "attention_factor": self.number(&key("rope.scaling.attn_factor")).unwrap_or(1.0),
            });
            // Where Phi-3's config class reads it, overriding the scaling's own.
            config["original_max_position_embeddings"] = original.into();
        }
        (form.translate)(self, &mut config)?;
        match self.string(&key("rope.scaling.type")) {
            None | Some("none") => {}
            // The family's own reading of the scaling.
            Some(_) if config.get("rope_scaling").is_some() => {}
            Some("linear") => {
                config["rope_scaling"] = serde_json::json!({
                    "rope_type": "linear",
                    "factor": required("rope.scaling.factor")?,
                })
            }
            Some(other) => bail!("rope scaling `{other}` in GGUF files is not supported yet"),
        }
        // Integral numbers must be JSON integers for the config parser.
        for value in config.as_object_mut().expect("an object").values_mut() {
            if let Some(n) = value.as_f64() {
                if n.fract() == 0.0 && n.abs() < 1e15 && !value.is_i64() {
                    *value = (n as i64).into();
                }
            }
        }
        Ok(config)
    }
}

/// Where a tensor of a GGUF file goes among the Hugging Face names of the family's layout.
#[derive(Debug, PartialEq)]
pub enum HfTensor {
    One(String),
    /// Half of a latent-attention up-projection (`kv_b_proj`), which the converter splits per
    /// head into its key rows, transposed, and its value rows.
    LatentUp {
        name: String,
        half: LatentHalf,
    },
    /// One tensor stacking every expert of a layer along its slowest dimension, as llama.cpp
    /// stores them: `experts` slices, expert `e`'s named `{prefix}{e}{suffix}`.
    PerExpert {
        prefix: String,
        suffix: String,
        experts: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LatentHalf {
    /// `attn_k_b`: `[heads, kv_lora_rank, nope_dim]`.
    Key,
    /// `attn_v_b`: `[heads, v_dim, kv_lora_rank]`.
    Value,
}

/// Where llama.cpp's converter's tensor `name` goes (it renames every tensor the same way for
/// every architecture), or `None` for tensors vibee does not read.
pub fn hf_name(name: &str, config: &ModelConfig) -> Option<HfTensor> {
    let layout = &config.layout;
    let (stem, suffix) = name.rsplit_once('.')?;
    let global = match stem {
        "token_embd" => Some(layout.embed),
        "token_embd_norm" => layout.embed_norm,
        "position_embd" => layout.position_embed,
        "output_norm" => Some(layout.final_norm),
        "output" => Some(layout.lm_head),
        _ => None,
    };
    if let Some(hf) = global {
        return Some(HfTensor::One(format!("{hf}.{suffix}")));
    }
    let (layer, part) = stem.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let prefix = format!("{}.{layer}", layout.layers);
    let one = |hf: String| Some(HfTensor::One(format!("{prefix}.{hf}.{suffix}")));
    if let Some(moe) = &config.moe {
        let block = moe.layout.block();
        let [gate, up, down] = moe.layout.expert_projections();
        let shared = moe.layout.shared_expert();
        let experts = |projection: &str| {
            Some(HfTensor::PerExpert {
                prefix: format!("{prefix}.{block}.experts."),
                suffix: format!(".{projection}.{suffix}"),
                experts: moe.experts,
            })
        };
        match part {
            "ffn_gate_inp" => return one(format!("{block}.gate")),
            "ffn_gate_exps" => return experts(gate),
            "ffn_up_exps" => return experts(up),
            "ffn_down_exps" => return experts(down),
            "ffn_gate_shexp" => return one(format!("{block}.{shared}.gate_proj")),
            "ffn_up_shexp" => return one(format!("{block}.{shared}.up_proj")),
            "ffn_down_shexp" => return one(format!("{block}.{shared}.down_proj")),
            "ffn_gate_inp_shexp" => return one(format!("{block}.shared_expert_gate")),
            _ => {}
        }
    }
    if config.mla.is_some() {
        let latent = |half| {
            Some(HfTensor::LatentUp {
                name: format!("{prefix}.{}.kv_b_proj.{suffix}", layout.attention),
                half,
            })
        };
        match part {
            "attn_k_b" => return latent(LatentHalf::Key),
            "attn_v_b" => return latent(LatentHalf::Value),
            "attn_q_a" => return one(format!("{}.q_a_proj", layout.attention)),
            "attn_q_a_norm" => return one(format!("{}.q_a_layernorm", layout.attention)),
            "attn_q_b" => return one(format!("{}.q_b_proj", layout.attention)),
            "attn_kv_a_mqa" => return one(format!("{}.kv_a_proj_with_mqa", layout.attention)),
            "attn_kv_a_norm" => return one(format!("{}.kv_a_layernorm", layout.attention)),
            _ => {}
        }
    }
    let norms = &layout.norms;
    let family_norm = config.family().gguf.as_ref().and_then(|form| {
        form.norms
            .iter()
            .find(|(p, norm)| *p == part && norms.names().any(|name| name == *norm))
    });
    if let Some((_, norm)) = family_norm {
        return one(norm.to_string());
    }
    let attention = |projection: &str| format!("{}.{projection}", layout.attention);
    let mlp = |projection: &str| format!("mlp.{projection}");
    let gated = config.ffn == FfnKind::Gated;
    one(match part {
        "attn_norm" => norms.attn_in?.to_string(),
        "ffn_norm" => norms.ffn_in?.to_string(),
        "post_attention_norm" => norms.attn_out?.to_string(),
        "post_ffw_norm" => norms.ffn_out?.to_string(),
        "attn_q" => attention("q_proj"),
        "attn_k" => attention("k_proj"),
        "attn_v" => attention("v_proj"),
        "attn_q_norm" => attention("q_norm"),
        "attn_k_norm" => attention("k_norm"),
        "attn_output" => attention(layout.o_proj),
        "ffn_gate" if gated => mlp("gate_proj"),
        "ffn_up" if gated => mlp(layout.gate_up.unwrap_or("up_proj")),
        "ffn_down" if gated => mlp("down_proj"),
        "attn_qkv" => match layout.qkv {
            QkvLayout::Fused(name) | QkvLayout::Concat(name) => attention(name),
            QkvLayout::Separate => return None,
        },
        "ffn_up" => mlp(layout.mlp_in),
        "ffn_down" => mlp(layout.mlp_out),
        _ => return None,
    })
}
