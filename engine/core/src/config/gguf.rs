//! A GGUF file read as a Hugging Face checkpoint: the family it belongs to, the `config.json`
//! its metadata stands for, and where each of its tensors goes among the family's names.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};

use super::families;
use super::{FfnKind, ModelConfig, QkvLayout};
use crate::io::gguf::{Gguf, TensorInfo, Value};
use crate::io::weights::{owned, DType, Entry, Storage, Weights};

/// The family vibee reads this file as.
pub fn family(file: &Gguf) -> Option<&'static families::Family> {
    let arch = file.string("general.architecture")?;
    // A count of 0 is how the converter writes a dense model that has the key.
    families::from_gguf(arch, |key| {
        file.number(&format!("{arch}.{key}"))
            .is_some_and(|n| n > 0.0)
    })
}

/// `general.architecture`, when vibee runs it.
pub fn architecture(file: &Gguf) -> anyhow::Result<&str> {
    let arch = file
        .string("general.architecture")
        .context("the file has no general.architecture")?;
    if family(file).is_none() {
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
pub fn hf_config(file: &Gguf) -> anyhow::Result<serde_json::Value> {
    let arch = architecture(file)?;
    let family = family(file).expect("checked");
    let form = family
        .gguf
        .as_ref()
        .expect("a family found by its GGUF form");
    let key = |name: &str| format!("{arch}.{name}");
    let required = |name: &str| {
        file.number(&key(name))
            .with_context(|| format!("the file has no {}", key(name)))
    };
    let heads = required("attention.head_count")?;
    let hidden = required("embedding_length")?;
    let head_dim = file
        .number(&key("attention.key_length"))
        .unwrap_or(hidden / heads);
    let vocab = match file.number(&key("vocab_size")) {
        Some(v) => v,
        None => match file.get("tokenizer.ggml.tokens") {
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
        "num_key_value_heads": file.number(&key("attention.head_count_kv")).unwrap_or(heads),
        "head_dim": head_dim,
        "rms_norm_eps": match file.number(&key("attention.layer_norm_rms_epsilon")) {
            Some(eps) => eps,
            None => required("attention.layer_norm_epsilon")?,
        },
        "rope_theta": file.number(&key("rope.freq_base")).unwrap_or(10000.0),
        "max_position_embeddings": required("context_length")?,
        "vocab_size": vocab,
        "tie_word_embeddings": file.tensor("output.weight").is_none(),
    });
    for (part, field) in form.flags {
        config[*field] = file
            .tensor(&format!("blk.0.{part}.weight"))
            .is_some()
            .into();
    }
    for (name, field) in form.metadata {
        match (file.get(&key(name)), file.number(&key(name))) {
            (Some(Value::Bool(flag)), _) => config[*field] = (*flag).into(),
            // llama.cpp writes a window of 0 for none.
            (_, Some(0.0)) if *field == "sliding_window" => {}
            (_, Some(value)) => config[*field] = value.into(),
            _ => {}
        }
    }
    // llama.cpp turns the first `rope.dimension_count` dimensions of each head.
    let rotary = file
        .number(&key("rope.dimension_count"))
        .unwrap_or(head_dim);
    if rotary != head_dim {
        config["partial_rotary_factor"] = (rotary / head_dim).into();
    }
    for (name, field) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
    ] {
        if let Some(id) = file.number(name) {
            config[field] = id.into();
        }
    }
    // llama.cpp's converter turns Llama 3's rope scaling into a divisor per frequency
    // (`rope_freqs`), the form transformers calls longrope's factors: the same divisors at
    // every length, with cos/sin unscaled.
    let per_frequency = |name: &str| -> anyhow::Result<Option<Vec<f32>>> {
        let Some(t) = file.tensor(name) else {
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
        Ok(Some(file.dequantize(t)))
    };
    if let Some(factors) = per_frequency("rope_freqs.weight")? {
        if file
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
            "attention_factor": file.number(&key("rope.scaling.attn_factor")).unwrap_or(1.0),
        });
        // Where Phi-3's config class reads it, overriding the scaling's own.
        config["original_max_position_embeddings"] = original.into();
    }
    (form.translate)(file, &mut config)?;
    match file.string(&key("rope.scaling.type")) {
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

/// The tensors of a GGUF file, under their Hugging Face names in `config`'s layout, read
/// in place; a layer's stacked experts become one entry per expert.
pub fn weights(path: &Path, file: &Gguf, config: &ModelConfig) -> anyhow::Result<Weights> {
    let mut entries = HashMap::new();
    let mut latent: HashMap<String, [Option<&TensorInfo>; 2]> = HashMap::new();
    for t in &file.tensors {
        // GGML lists the contiguous dimension first.
        let shape: Vec<usize> = t.dims.iter().rev().map(|d| *d as usize).collect();
        let entry = |start, len, shape| Entry {
            file: 0,
            start,
            len,
            dtype: Ok(t.kind),
            shape,
        };
        match hf_name(&t.name, config) {
            None => {}
            Some(HfTensor::One(name)) => {
                entries.insert(name, entry(t.start, t.len, shape));
            }
            Some(HfTensor::LatentUp { name, half }) => {
                latent.entry(name).or_default()[half as usize] = Some(t);
            }
            Some(HfTensor::PerExpert {
                prefix,
                suffix,
                experts,
            }) => {
                // Checked before any entry is made: the count comes from the metadata.
                if shape.len() != 3 || shape[0] != experts || !t.len.is_multiple_of(experts) {
                    anyhow::bail!(
                        "GGUF tensor `{}` has shape {:?}: it should stack {experts} experts",
                        t.name,
                        t.dims
                    );
                }
                let len = t.len / experts;
                for e in 0..experts {
                    let name = format!("{prefix}{e}{suffix}");
                    entries.insert(name, entry(t.start + e * len, len, shape[1..].to_vec()));
                }
            }
        }
    }
    let mut files = vec![(path.to_path_buf(), Storage::Mapped(file.map.clone()))];
    for (name, halves) in latent {
        let [Some(key), Some(value)] = halves else {
            anyhow::bail!("GGUF file has one half of `{name}` (attn_k_b and attn_v_b go together)");
        };
        let (rows, values) = latent_up_projection(file, key, value, config)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        entries.insert(
            name,
            Entry {
                file: files.len(),
                start: 0,
                len: bytes.len(),
                dtype: Ok(DType::F32),
                shape: vec![rows, values.len() / rows],
            },
        );
        files.push((path.to_path_buf(), owned(&bytes)));
    }
    Ok(Weights {
        files,
        entries,
        ggml_shapes: true,
    })
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

/// DeepSeek-V2's `kv_b_proj` (per head, `nope_dim` key rows then `v_dim` value rows of
/// `kv_lora_rank` columns) from the converter's per-head halves: the key half transposed
/// (`[heads, kv_lora_rank, nope_dim]`), the value half as it was. Quantized halves are
/// dequantized: latent attention multiplies this matrix in f32 however it is stored.
fn latent_up_projection(
    file: &Gguf,
    key: &TensorInfo,
    value: &TensorInfo,
    config: &ModelConfig,
) -> anyhow::Result<(usize, Vec<f32>)> {
    let m = config
        .mla
        .expect("latent halves are named only for latent attention");
    let heads = config.num_heads as u64;
    let (rank, nope, v) = (m.kv_lora_rank as u64, m.nope_dim as u64, m.v_dim as u64);
    for (t, want) in [(key, [nope, rank, heads]), (value, [rank, v, heads])] {
        if t.dims != want {
            anyhow::bail!(
                "GGUF tensor `{}` has dimensions {:?}; the metadata implies {want:?}",
                t.name,
                t.dims
            );
        }
    }
    let (key, value) = (file.dequantize(key), file.dequantize(value));
    let (rank, nope, v) = (rank as usize, nope as usize, v as usize);
    let mut rows = Vec::with_capacity(key.len() + value.len());
    for (key_head, value_head) in key
        .chunks_exact(rank * nope)
        .zip(value.chunks_exact(v * rank))
    {
        for i in 0..nope {
            rows.extend((0..rank).map(|r| key_head[r * nope + i]));
        }
        rows.extend_from_slice(value_head);
    }
    Ok((config.num_heads * (nope + v), rows))
}
