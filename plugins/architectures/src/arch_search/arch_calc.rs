//! v2280 `arch-calc`: the size and cost of a decoder architecture, worked out from its
//! Hugging Face `config.json` (or from a handful of dimensions) without loading any weight.
//!
//! - **Parameters**, exactly as the checkpoint stores them (tied embeddings counted once), by
//!   part: embedding, attention, ffn (dense feed-forward, routers, shared experts), routed
//!   experts, norms and lm_head; and the parameters **active** per token of a mixture of
//!   experts (only `top_k` of the routed experts run).
//! - **FLOPs**: a decode step at context `T` costs `2 · active matmul weights` (the lm_head
//!   included, tied or not; embedding lookups, norms and biases are not matmuls) plus the
//!   attention scores and weighted values, `2 · heads · T · (qk_dim + v_dim)` per layer. A
//!   prefill of `P` tokens costs `2 · active matmul weights · P` (logits at every position, as
//!   a forward pass computes them) plus the causal attention, `P(P+1)/2` query-key pairs.
//!   Sliding windows are not taken into account.
//! - **KV cache**: a key and a value of `head_dim` per key/value head per layer; multi-head
//!   latent attention (DeepSeek-V2) caches the compressed latent plus the shared rope key,
//!   `kv_lora_rank + qk_rope_head_dim`, per layer.
//! - **Memory**: the weights at one dtype plus the KV cache of `batch` sequences of `context`
//!   tokens.
//! - **Chinchilla** (Hoffmann et al. 2022): about 20 training tokens per parameter; a compute
//!   budget `C ≈ 6·N·D` with `D = 20·N` gives `N = sqrt(C / 120)`.
//! - **Sweep**: Llama-style shapes (hidden a multiple of 128, head_dim 128, SwiGLU intermediate
//!   8/3·hidden rounded up to 256) within ±10% of a parameter budget.
//!
//! Configs are read by the engine's own reader (`vibee_core::config`), so what `vibee arch`
//! sizes is what `vibee run` loads; keys the engine would refuse are reported as warnings.

use std::fmt::{self, Write as _};
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use vibee_core::config::{FfnKind, Lenient, NormKind, PositionKind, QkNormScope};
use vibee_core::tools::conformance::ParameterCounter;
use vibee_core::ModelConfig;
use vibee_core::{App, Plugin, PluginSpec};

pub struct ArchCalc;

impl Plugin for ArchCalc {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2280",
            name: "arch-calc",
        }
    }

    /// A tool (`vibee arch`) rather than a pipeline stage: it offers its parameter counter
    /// to the world, which is how `vibee conformance` checks it.
    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        app.world
            .insert_resource(ParameterCounter(parameter_counts));
        Ok(())
    }
}

/// Training tokens per parameter at the Chinchilla compute optimum.
pub const TOKENS_PER_PARAM: f64 = 20.0;

// ── Architecture description ──────────────────────────────────────────────────────────────

/// A feed-forward block: gated (`down(act(gate x) * up x)`, three matrices) or plain
/// (`proj(act(fc x))`, two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ffn {
    pub intermediate: u64,
    pub gated: bool,
    pub bias: bool,
}

impl Ffn {
    fn weights(&self, hidden: u64) -> u64 {
        (if self.gated { 3 } else { 2 }) * hidden * self.intermediate
    }

    fn biases(&self, hidden: u64) -> u64 {
        match (self.bias, self.gated) {
            (false, _) => 0,
            (true, true) => 2 * self.intermediate + hidden,
            (true, false) => self.intermediate + hidden,
        }
    }

    fn params(&self, hidden: u64) -> u64 {
        self.weights(hidden) + self.biases(hidden)
    }
}

/// Norms of queries and keys inside attention (RMSNorm, no bias).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// One gain vector of head_dim for queries and one for keys (Qwen3).
    PerHead,
    /// Over the whole q and k projections (OLMo 2).
    Whole,
}

/// DeepSeek multi-head latent attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mla {
    /// `None`: a plain `q_proj` instead of the low-rank `q_a_proj`/`q_b_proj` pair.
    pub q_lora_rank: Option<u64>,
    pub kv_lora_rank: u64,
    pub qk_rope_head_dim: u64,
    pub qk_nope_head_dim: u64,
    pub v_head_dim: u64,
    /// Biases on `q_a_proj`, `kv_a_proj_with_mqa` and `o_proj` (`attention_bias`).
    pub bias: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attention {
    /// q/k/v/o projections, `kv_heads` key/value heads each serving a group of query heads.
    Standard {
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: QkNorm,
    },
    Latent(Mla),
}

/// The hidden-size norms: `per_layer` in every layer plus the final one, LayerNorm (`bias`)
/// or RMSNorm; `embedding`: one more right after the embedding (BLOOM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Norms {
    pub bias: bool,
    pub per_layer: u64,
    pub embedding: bool,
}

/// Mixture of experts in `layers` of the decoder layers (the others use the dense `Arch::ffn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Moe {
    pub experts: u64,
    pub top_k: u64,
    pub expert: Ffn,
    /// An always-on shared expert (Qwen2-MoE, DeepSeek-V2).
    pub shared: Option<Ffn>,
    /// A sigmoid gate `[1, hidden]` on the shared expert (Qwen2-MoE).
    pub shared_gate: bool,
    pub layers: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arch {
    /// The config's `model_type`, or `custom` for a decoder given by flags.
    pub model_type: String,
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    /// Query/key head dimension (for MLA: nope + rope).
    pub head_dim: u64,
    pub vocab: u64,
    pub tied: bool,
    /// Rows of a learned absolute position embedding (GPT-2), 0 otherwise.
    pub positions: u64,
    pub attention: Attention,
    pub norms: Norms,
    /// The feed-forward block of the dense layers.
    pub ffn: Ffn,
    pub moe: Option<Moe>,
}

/// Parameters by part; the parts add up to `total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Params {
    pub total: u64,
    /// Per token: every parameter except the routed experts a token is not sent to.
    pub active: u64,
    /// Token embeddings, plus learned position embeddings where the model has them.
    pub embedding: u64,
    pub attention: u64,
    /// Dense feed-forward layers, routers and shared experts.
    pub ffn: u64,
    /// Routed experts (0 for a dense model).
    pub experts: u64,
    pub norms: u64,
    /// 0 when tied to the embedding.
    pub lm_head: u64,
}

impl Arch {
    fn dense_layers(&self) -> u64 {
        self.layers - self.moe.map_or(0, |m| m.layers)
    }

    fn norm_width(&self, width: u64) -> u64 {
        if self.norms.bias {
            2 * width
        } else {
            width
        }
    }

    /// Attention weights and biases of one layer.
    fn attention_layer(&self) -> (u64, u64) {
        let h = self.hidden;
        match self.attention {
            Attention::Standard {
                qkv_bias, o_bias, ..
            } => {
                let q = self.heads * self.head_dim;
                let kv = self.kv_heads * self.head_dim;
                let weights = h * q + 2 * h * kv + q * h;
                let biases = if qkv_bias { q + 2 * kv } else { 0 } + if o_bias { h } else { 0 };
                (weights, biases)
            }
            Attention::Latent(m) => {
                let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
                let q = match m.q_lora_rank {
                    Some(r) => h * r + r * self.heads * qk,
                    None => h * self.heads * qk,
                };
                let kv_a = h * (m.kv_lora_rank + m.qk_rope_head_dim);
                let kv_b = m.kv_lora_rank * self.heads * (m.qk_nope_head_dim + m.v_head_dim);
                let o = self.heads * m.v_head_dim * h;
                let biases = if m.bias {
                    m.q_lora_rank.unwrap_or(0) + m.kv_lora_rank + m.qk_rope_head_dim + h
                } else {
                    0
                };
                (q + kv_a + kv_b + o, biases)
            }
        }
    }

    /// Norm weights inside one layer's attention (q/k norms, MLA's latent norms).
    fn attention_norms(&self) -> u64 {
        match self.attention {
            Attention::Standard { qk_norm, .. } => match qk_norm {
                QkNorm::None => 0,
                QkNorm::PerHead => 2 * self.head_dim,
                QkNorm::Whole => (self.heads + self.kv_heads) * self.head_dim,
            },
            Attention::Latent(m) => m.q_lora_rank.unwrap_or(0) + m.kv_lora_rank,
        }
    }

    /// One MoE layer's weights and biases outside the routed experts: router, shared expert
    /// and its gate.
    fn moe_dense_part(&self, m: &Moe) -> (u64, u64) {
        let h = self.hidden;
        let shared = m.shared.map_or((0, 0), |s| (s.weights(h), s.biases(h)));
        let gate = if m.shared_gate { h } else { 0 };
        (m.experts * h + shared.0 + gate, shared.1)
    }

    pub fn params(&self) -> Params {
        let h = self.hidden;
        let (attn_w, attn_b) = self.attention_layer();
        let embedding = (self.vocab + self.positions) * h;
        let attention = self.layers * (attn_w + attn_b);
        let mut ffn = self.dense_layers() * self.ffn.params(h);
        let mut experts = 0;
        let mut inactive = 0;
        if let Some(m) = &self.moe {
            let (w, b) = self.moe_dense_part(m);
            ffn += m.layers * (w + b);
            experts = m.layers * m.experts * m.expert.params(h);
            inactive = m.layers * (m.experts - m.top_k) * m.expert.params(h);
        }
        let norms = self.layers
            * (self.norms.per_layer * self.norm_width(h) + self.attention_norms())
            + self.norm_width(h)
            + if self.norms.embedding {
                self.norm_width(h)
            } else {
                0
            };
        let lm_head = if self.tied { 0 } else { self.vocab * h };
        let total = embedding + attention + ffn + experts + norms + lm_head;
        Params {
            total,
            active: total - inactive,
            embedding,
            attention,
            ffn,
            experts,
            norms,
            lm_head,
        }
    }

    /// Weights of the matrices a token is multiplied by: projections, the active experts,
    /// routers and the lm_head (even when tied to the embedding).
    pub fn active_matmul_params(&self) -> u64 {
        let h = self.hidden;
        let mut total = self.layers * self.attention_layer().0
            + self.dense_layers() * self.ffn.weights(h)
            + self.vocab * h;
        if let Some(m) = &self.moe {
            total += m.layers * (self.moe_dense_part(m).0 + m.top_k * m.expert.weights(h));
        }
        total
    }

    /// Per-head dimensions of the attention scores (q·k) and of the values.
    fn score_dims(&self) -> (u64, u64) {
        match self.attention {
            Attention::Standard { .. } => (self.head_dim, self.head_dim),
            Attention::Latent(m) => (m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim),
        }
    }

    /// Attention FLOPs of one query against one cached position, over all layers.
    fn attention_flops_per_pair(&self) -> f64 {
        let (qk, v) = self.score_dims();
        2.0 * (self.layers * self.heads * (qk + v)) as f64
    }

    /// (matmul, attention) FLOPs of decoding one token at `context` positions.
    pub fn decode_flops(&self, context: u64) -> (f64, f64) {
        (
            2.0 * self.active_matmul_params() as f64,
            self.attention_flops_per_pair() * context as f64,
        )
    }

    /// (matmul, attention) FLOPs of a causal prefill of `prompt` tokens.
    pub fn prefill_flops(&self, prompt: u64) -> (f64, f64) {
        let p = prompt as f64;
        (
            2.0 * self.active_matmul_params() as f64 * p,
            self.attention_flops_per_pair() * p * (p + 1.0) / 2.0,
        )
    }

    /// Cached values per token per layer: k and v per KV head, or MLA's latent + rope key.
    pub fn kv_elements_per_layer(&self) -> u64 {
        match self.attention {
            Attention::Standard { .. } => 2 * self.kv_heads * self.head_dim,
            Attention::Latent(m) => m.kv_lora_rank + m.qk_rope_head_dim,
        }
    }

    /// `mha`, `mqa`, `gqa` or `mla`.
    pub fn attention_kind(&self) -> &'static str {
        match self.attention {
            Attention::Latent(_) => "mla",
            Attention::Standard { .. } if self.kv_heads == self.heads => "mha",
            Attention::Standard { .. } if self.kv_heads == 1 => "mqa",
            Attention::Standard { .. } => "gqa",
        }
    }

    /// Cross-field checks (each dimension was already checked to be at least 1).
    pub fn validate(&self) -> anyhow::Result<()> {
        if matches!(self.attention, Attention::Standard { .. })
            && (self.kv_heads > self.heads || !self.heads.is_multiple_of(self.kv_heads))
        {
            bail!(
                "{} key/value heads cannot serve {} attention heads: the attention heads must be a multiple of the key/value heads",
                self.kv_heads,
                self.heads
            );
        }
        if let Some(m) = &self.moe {
            if m.top_k > m.experts {
                bail!(
                    "{} experts per token, but only {} experts",
                    m.top_k,
                    m.experts
                );
            }
            if m.layers > self.layers {
                bail!(
                    "{} expert layers in a {}-layer model",
                    m.layers,
                    self.layers
                );
            }
        }
        Ok(())
    }
}

fn per_head(hidden: u64, heads: u64) -> anyhow::Result<u64> {
    if !hidden.is_multiple_of(heads) {
        bail!(
            "hidden size {hidden} is not divisible by {heads} attention heads; give the head dimension (head_dim, --head-dim)"
        );
    }
    Ok(hidden / heads)
}

// ── config.json ───────────────────────────────────────────────────────────────────────────

/// Reads a Hugging Face `config.json` through the engine's own reader, so `vibee arch` sizes
/// exactly what `vibee run` would load. Keys the engine does not understand are returned as
/// warnings rather than refused: the sizes do not depend on them.
pub fn read_config(path: &Path) -> anyhow::Result<(Arch, Vec<String>)> {
    let text = vibee_core::io::read_regular_text(path, vibee_core::io::SMALL_FILE)?;
    from_config(&text).with_context(|| path.display().to_string())
}

/// (total, active) parameters of the model a config.json describes.
pub fn parameter_counts(config: &Path) -> anyhow::Result<(u64, u64)> {
    let params = read_config(config)?.0.params();
    Ok((params.total, params.active))
}

/// The architecture of a config.json's text, and the keys `vibee run` would refuse.
pub fn from_config(text: &str) -> anyhow::Result<(Arch, Vec<String>)> {
    let Lenient {
        config,
        unknown_keys,
    } = ModelConfig::lenient(text)?;
    let arch = from_model_config(&config);
    arch.validate()?;
    Ok((arch, unknown_keys))
}

/// The shapes of the model `config` describes.
pub fn from_model_config(c: &ModelConfig) -> Arch {
    let n = |v: usize| v as u64;
    let attention = match c.mla {
        Some(m) => Attention::Latent(Mla {
            q_lora_rank: m.q_lora_rank.map(n),
            kv_lora_rank: n(m.kv_lora_rank),
            qk_rope_head_dim: n(m.rope_dim),
            qk_nope_head_dim: n(m.nope_dim),
            v_head_dim: n(m.v_dim),
            bias: false,
        }),
        None => Attention::Standard {
            qkv_bias: c.qkv_bias,
            o_bias: c.o_bias,
            qk_norm: match c.qk_norm {
                None => QkNorm::None,
                Some(QkNormScope::PerHead) => QkNorm::PerHead,
                Some(QkNormScope::Whole) => QkNorm::Whole,
            },
        },
    };
    // A norm shared by attention and feed-forward (Falcon) is stored once.
    let norm_tensors: std::collections::BTreeSet<&str> = c.layout.norms.names().collect();
    let gated = |intermediate: usize| Ffn {
        intermediate: n(intermediate),
        gated: true,
        bias: false,
    };
    Arch {
        model_type: c.model_type.clone(),
        hidden: n(c.hidden_size),
        layers: n(c.num_layers),
        heads: n(c.num_heads),
        kv_heads: n(c.num_kv_heads),
        head_dim: match c.mla {
            Some(m) => n(m.nope_dim + m.rope_dim),
            None => n(c.head_dim),
        },
        vocab: n(c.vocab_size),
        tied: c.tie_word_embeddings,
        positions: match c.position {
            PositionKind::Learned => n(c.max_position_embeddings),
            _ => 0,
        },
        attention,
        norms: Norms {
            bias: matches!(c.norm, NormKind::Layer { bias: true }),
            per_layer: norm_tensors.len() as u64,
            embedding: c.layout.embed_norm.is_some(),
        },
        ffn: match c.ffn {
            FfnKind::Gated => gated(c.intermediate_size),
            FfnKind::Plain { bias } => Ffn {
                intermediate: n(c.intermediate_size),
                gated: false,
                bias,
            },
        },
        moe: c.moe.as_ref().map(|m| Moe {
            experts: n(m.experts),
            top_k: n(m.top_k),
            expert: gated(m.expert_intermediate),
            shared: m.shared_intermediate.map(gated),
            shared_gate: m.shared_gate,
            layers: m.sparse_layers.iter().filter(|s| **s).count() as u64,
        }),
    }
}

// ── A decoder from flags ──────────────────────────────────────────────────────────────────

/// A Llama-style decoder (RMSNorm, SwiGLU, no biases) from its dimensions; with `experts`, a
/// Mixtral-style mixture of experts in every layer (each expert `intermediate` wide).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dims {
    pub hidden: Option<u64>,
    pub layers: Option<u64>,
    pub heads: Option<u64>,
    /// Default: `heads` (multi-head attention).
    pub kv_heads: Option<u64>,
    pub intermediate: Option<u64>,
    pub vocab: Option<u64>,
    /// Default: `hidden / heads`.
    pub head_dim: Option<u64>,
    pub experts: Option<u64>,
    pub experts_per_token: Option<u64>,
    pub tied: bool,
}

impl Dims {
    /// Whether any dimension flag is set (so the command describes a model by flags).
    pub fn any(&self) -> bool {
        [
            self.hidden,
            self.layers,
            self.heads,
            self.kv_heads,
            self.intermediate,
            self.vocab,
            self.head_dim,
            self.experts,
            self.experts_per_token,
        ]
        .iter()
        .any(Option::is_some)
            || self.tied
    }
}

pub fn from_dims(d: &Dims) -> anyhow::Result<Arch> {
    fn positive(value: Option<u64>, flag: &str) -> anyhow::Result<Option<u64>> {
        match value {
            Some(0) => bail!("--{flag} must be at least 1"),
            other => Ok(other),
        }
    }
    let need = |value: Option<u64>, flag: &str| -> anyhow::Result<u64> {
        positive(value, flag)?.ok_or_else(|| {
            anyhow!(
                "--{flag} is missing: a decoder from flags needs --hidden, --layers, --heads, --intermediate and --vocab (or give --config PATH)"
            )
        })
    };
    let hidden = need(d.hidden, "hidden")?;
    let layers = need(d.layers, "layers")?;
    let heads = need(d.heads, "heads")?;
    let intermediate = need(d.intermediate, "intermediate")?;
    let vocab = need(d.vocab, "vocab")?;
    let kv_heads = positive(d.kv_heads, "kv-heads")?.unwrap_or(heads);
    let head_dim = match positive(d.head_dim, "head-dim")? {
        Some(dim) => dim,
        None => per_head(hidden, heads)?,
    };
    let ffn = Ffn {
        intermediate,
        gated: true,
        bias: false,
    };
    let moe = match (
        positive(d.experts, "experts")?,
        positive(d.experts_per_token, "experts-per-token")?,
    ) {
        (None, None) => None,
        (Some(experts), Some(top_k)) => Some(Moe {
            experts,
            top_k,
            expert: ffn,
            shared: None,
            shared_gate: false,
            layers,
        }),
        (Some(_), None) => bail!("--experts needs --experts-per-token"),
        (None, Some(_)) => bail!("--experts-per-token needs --experts"),
    };
    let arch = Arch {
        model_type: "custom".into(),
        hidden,
        layers,
        heads,
        kv_heads,
        head_dim,
        vocab,
        tied: d.tied,
        positions: 0,
        attention: Attention::Standard {
            qkv_bias: false,
            o_bias: false,
            qk_norm: QkNorm::None,
        },
        norms: Norms {
            bias: false,
            per_layer: 2,
            embedding: false,
        },
        ffn,
        moe,
    };
    arch.validate()?;
    Ok(arch)
}

// ── Report ────────────────────────────────────────────────────────────────────────────────

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    Int8,
}

impl Dtype {
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::Int8 => 1,
        }
    }
}

impl FromStr for Dtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Dtype::F32),
            "f16" | "fp16" | "float16" => Ok(Dtype::F16),
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "int8" | "i8" => Ok(Dtype::Int8),
            _ => Err(format!("unknown dtype `{s}`; use f32, f16, bf16 or int8")),
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::Int8 => "int8",
        })
    }
}

/// A count such as `7e9`, `7000000000`, `7B`, `125M`, `1.5T` or `10k` (for parameter and
/// FLOP budgets).
pub fn parse_quantity(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (number, scale) = match t.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&t[..t.len() - 1], 1e3),
        Some('m') => (&t[..t.len() - 1], 1e6),
        Some('b') | Some('g') => (&t[..t.len() - 1], 1e9),
        Some('t') => (&t[..t.len() - 1], 1e12),
        _ => (t, 1.0),
    };
    let value = number
        .trim()
        .replace('_', "")
        .parse::<f64>()
        .map_err(|_| format!("`{s}` is not a number (examples: 7e9, 7B, 125M, 1.5T)"))?
        * scale;
    if !(value.is_finite() && value > 0.0) {
        return Err(format!("`{s}` must be a positive, finite number"));
    }
    Ok(value)
}

/// What the report is computed at.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Positions a decoded token attends to; also the per-sequence KV length for memory.
    pub context: u64,
    /// Tokens in the prefill estimate.
    pub prompt: u64,
    pub batch: u64,
    /// Weights' dtype.
    pub dtype: Dtype,
    pub kv_dtype: Dtype,
    /// A training compute budget in FLOPs, for its compute-optimal model size.
    pub flops_budget: Option<f64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            context: 2048,
            prompt: 512,
            batch: 1,
            dtype: Dtype::Bf16,
            kv_dtype: Dtype::Bf16,
            flops_budget: None,
        }
    }
}

impl Options {
    fn validate(&self) -> anyhow::Result<()> {
        for (value, flag) in [
            (self.context, "context"),
            (self.prompt, "prompt"),
            (self.batch, "batch"),
        ] {
            if value == 0 {
                bail!("--{flag} must be at least 1");
            }
        }
        if let Some(c) = self.flops_budget {
            check_budget(c)?;
        }
        Ok(())
    }
}

fn check_budget(flops: f64) -> anyhow::Result<()> {
    if !(flops.is_finite() && flops > 0.0) {
        bail!("--flops must be a positive, finite number of FLOPs");
    }
    Ok(())
}

/// The architecture's shape, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct Shape {
    pub model_type: String,
    pub attention: &'static str,
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub intermediate: u64,
    pub vocab: u64,
    pub tied: bool,
    pub kv_lora_rank: Option<u64>,
    pub experts: Option<u64>,
    pub experts_per_token: Option<u64>,
    pub expert_intermediate: Option<u64>,
    pub moe_layers: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FlopsReport {
    pub context: u64,
    /// FLOPs of one decode step at `context`: `decode_matmul + decode_attention`.
    pub decode_per_token: f64,
    pub decode_matmul: f64,
    pub decode_attention: f64,
    pub prompt_tokens: u64,
    /// FLOPs of prefilling `prompt_tokens`: `prefill_matmul + prefill_attention`.
    pub prefill: f64,
    pub prefill_matmul: f64,
    pub prefill_attention: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct KvReport {
    pub dtype: Dtype,
    pub elements_per_token_per_layer: u64,
    pub bytes_per_token_per_layer: u64,
    pub bytes_per_token: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    pub batch: u64,
    pub context: u64,
    pub dtype: Dtype,
    pub weight_bytes: u64,
    pub kv_cache_bytes: u64,
    pub total_bytes: u64,
}

/// The compute-optimal model and data for a training budget (`C = 6·N·D`, `D = 20·N`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Budget {
    pub flops: f64,
    pub params: f64,
    pub tokens: f64,
}

pub fn compute_optimal(flops: f64) -> anyhow::Result<Budget> {
    check_budget(flops)?;
    let params = (flops / (6.0 * TOKENS_PER_PARAM)).sqrt();
    Ok(Budget {
        flops,
        params,
        tokens: TOKENS_PER_PARAM * params,
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct Chinchilla {
    pub tokens_per_param: f64,
    /// 20 × total parameters.
    pub optimal_tokens: f64,
    /// 6 × active parameters × `optimal_tokens`.
    pub training_flops: f64,
    pub budget: Option<Budget>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Where the architecture came from (a file name, or `flags`).
    pub source: String,
    pub model: Shape,
    pub params: Params,
    pub flops: FlopsReport,
    pub kv_cache: KvReport,
    pub memory: MemoryReport,
    pub chinchilla: Chinchilla,
}

pub fn report(arch: &Arch, source: &str, options: &Options) -> anyhow::Result<Report> {
    options.validate()?;
    let params = arch.params();
    let (decode_matmul, decode_attention) = arch.decode_flops(options.context);
    let (prefill_matmul, prefill_attention) = arch.prefill_flops(options.prompt);
    let kv_elements = arch.kv_elements_per_layer();
    let kv_layer = kv_elements * options.kv_dtype.bytes();
    let kv_token = kv_layer * arch.layers;
    let weight_bytes = params.total * options.dtype.bytes();
    let kv_cache_bytes = kv_token * options.batch * options.context;
    let optimal_tokens = TOKENS_PER_PARAM * params.total as f64;
    let mla = match arch.attention {
        Attention::Latent(m) => Some(m.kv_lora_rank),
        Attention::Standard { .. } => None,
    };
    Ok(Report {
        source: source.to_string(),
        model: Shape {
            model_type: arch.model_type.clone(),
            attention: arch.attention_kind(),
            hidden: arch.hidden,
            layers: arch.layers,
            heads: arch.heads,
            kv_heads: arch.kv_heads,
            head_dim: arch.head_dim,
            intermediate: arch.ffn.intermediate,
            vocab: arch.vocab,
            tied: arch.tied,
            kv_lora_rank: mla,
            experts: arch.moe.map(|m| m.experts),
            experts_per_token: arch.moe.map(|m| m.top_k),
            expert_intermediate: arch.moe.map(|m| m.expert.intermediate),
            moe_layers: arch.moe.map(|m| m.layers),
        },
        params,
        flops: FlopsReport {
            context: options.context,
            decode_per_token: decode_matmul + decode_attention,
            decode_matmul,
            decode_attention,
            prompt_tokens: options.prompt,
            prefill: prefill_matmul + prefill_attention,
            prefill_matmul,
            prefill_attention,
        },
        kv_cache: KvReport {
            dtype: options.kv_dtype,
            elements_per_token_per_layer: kv_elements,
            bytes_per_token_per_layer: kv_layer,
            bytes_per_token: kv_token,
        },
        memory: MemoryReport {
            batch: options.batch,
            context: options.context,
            dtype: options.dtype,
            weight_bytes,
            kv_cache_bytes,
            total_bytes: weight_bytes + kv_cache_bytes,
        },
        chinchilla: Chinchilla {
            tokens_per_param: TOKENS_PER_PARAM,
            optimal_tokens,
            training_flops: 6.0 * params.active as f64 * optimal_tokens,
            budget: options.flops_budget.map(compute_optimal).transpose()?,
        },
    })
}

impl Report {
    /// The human-readable table `vibee arch` prints.
    pub fn table(&self) -> String {
        let m = &self.model;
        let p = &self.params;
        let f = &self.flops;
        let kv = &self.kv_cache;
        let mem = &self.memory;
        let mut out = String::new();
        let mut shape = format!(
            "{} ({}): hidden {} · {} layers · {} heads / {} KV heads ({}) · head_dim {}",
            self.source,
            m.model_type,
            m.hidden,
            m.layers,
            m.heads,
            m.kv_heads,
            m.attention,
            m.head_dim
        );
        if let Some(rank) = m.kv_lora_rank {
            let _ = write!(shape, " · kv_lora_rank {rank}");
        }
        if m.moe_layers.is_none_or(|l| l < m.layers) {
            let _ = write!(shape, " · ffn {}", m.intermediate);
        }
        if let (Some(e), Some(k), Some(w), Some(l)) = (
            m.experts,
            m.experts_per_token,
            m.expert_intermediate,
            m.moe_layers,
        ) {
            let _ = write!(shape, " · {e} experts × {w}, top-{k}, in {l} layers");
        }
        let _ = write!(
            shape,
            " · vocab {} · {}",
            m.vocab,
            if m.tied { "tied" } else { "untied" }
        );
        let _ = writeln!(out, "{shape}\n");
        let share = |n: u64| 100.0 * n as f64 / p.total.max(1) as f64;
        let _ = writeln!(
            out,
            "{:<34}{:>18}  {}",
            "parameters",
            group(p.total),
            count(p.total as f64)
        );
        for (name, n) in [
            ("embedding", p.embedding),
            ("attention", p.attention),
            ("ffn", p.ffn),
            ("experts (routed)", p.experts),
            ("norms", p.norms),
            ("lm_head", p.lm_head),
        ] {
            if name == "experts (routed)" && m.experts.is_none() {
                continue;
            }
            let _ = writeln!(out, "  {name:<32}{:>18}  {:>5.1}%", group(n), share(n));
        }
        let _ = writeln!(
            out,
            "{:<34}{:>18}  {}\n",
            "active per token",
            group(p.active),
            count(p.active as f64)
        );
        let _ = writeln!(
            out,
            "{:<34}{:>18}  (matmul {} + attention {})",
            format!("FLOPs/token, decode @ {}", f.context),
            flops(f.decode_per_token),
            flops(f.decode_matmul),
            flops(f.decode_attention)
        );
        let _ = writeln!(
            out,
            "{:<34}{:>18}  (matmul {} + attention {})",
            format!("FLOPs, prefill of {} tokens", f.prompt_tokens),
            flops(f.prefill),
            flops(f.prefill_matmul),
            flops(f.prefill_attention)
        );
        let _ = writeln!(
            out,
            "{:<34}{:>18}  ({} per layer × {} layers, {} values per layer)",
            format!("KV cache/token ({})", kv.dtype),
            bytes(kv.bytes_per_token as f64),
            bytes(kv.bytes_per_token_per_layer as f64),
            m.layers,
            kv.elements_per_token_per_layer
        );
        let _ = writeln!(
            out,
            "{:<34}{:>18}  (weights {} {} + KV cache {})",
            format!("memory, batch {} × {} tokens", mem.batch, mem.context),
            bytes(mem.total_bytes as f64),
            bytes(mem.weight_bytes as f64),
            mem.dtype,
            bytes(mem.kv_cache_bytes as f64)
        );
        let c = &self.chinchilla;
        let _ = writeln!(
            out,
            "{:<34}{:>18}  ({} per parameter; training ≈ {:.3e} FLOPs = 6 · active · tokens)",
            "Chinchilla-optimal tokens",
            count(c.optimal_tokens),
            c.tokens_per_param,
            c.training_flops
        );
        if let Some(b) = &c.budget {
            out.push_str(&b.table());
        }
        out
    }
}

impl Budget {
    pub fn table(&self) -> String {
        format!(
            "{:<34}{:>18}  parameters, trained on {} tokens (C ≈ 6·N·D, D = 20·N)\n",
            format!("compute-optimal at {:.3e} FLOPs", self.flops),
            count(self.params),
            count(self.tokens)
        )
    }
}

// ── Sweep ─────────────────────────────────────────────────────────────────────────────────

/// Layer counts the sweep tries.
pub const SWEEP_LAYERS: &[u64] = &[4, 8, 12, 16, 24, 32, 40, 48, 64, 80, 96, 128];
/// Hidden size per layer the sweep keeps (width/depth aspect ratios of trained models).
pub const SWEEP_ASPECT: (u64, u64) = (32, 256);
pub const SWEEP_TOLERANCE: f64 = 0.10;

#[derive(Clone, Debug, PartialEq)]
pub struct SweepOptions {
    /// Target parameter count.
    pub budget: f64,
    pub vocab: u64,
    /// Key/value heads (grouped-query attention); default: one per head.
    pub kv_heads: Option<u64>,
    pub tied: bool,
    pub context: u64,
    pub kv_dtype: Dtype,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            budget: 7e9,
            vocab: 32000,
            kv_heads: None,
            tied: false,
            context: 2048,
            kv_dtype: Dtype::Bf16,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SweepRow {
    pub layers: u64,
    pub hidden: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub intermediate: u64,
    pub params: u64,
    /// `params / budget - 1`.
    pub deviation: f64,
    /// Decode FLOPs per token at the sweep's context.
    pub flops_per_token: f64,
    pub kv_bytes_per_token: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    pub budget: f64,
    pub tolerance: f64,
    pub vocab: u64,
    pub kv_heads: Option<u64>,
    pub tied: bool,
    pub context: u64,
    pub kv_dtype: Dtype,
    pub configs: Vec<SweepRow>,
}

/// SwiGLU width of a Llama-style model: 8/3 · hidden, rounded up to a multiple of 256.
pub fn llama_intermediate(hidden: u64) -> u64 {
    (8 * hidden).div_ceil(3).div_ceil(256) * 256
}

pub fn sweep(options: &SweepOptions) -> anyhow::Result<Sweep> {
    let budget = options.budget;
    if !(budget.is_finite() && budget >= 1.0) {
        bail!("--sweep needs a positive parameter budget, such as 7e9 or 7B");
    }
    if options.vocab == 0 {
        bail!("--vocab must be at least 1");
    }
    if options.kv_heads == Some(0) {
        bail!("--kv-heads must be at least 1");
    }
    if options.context == 0 {
        bail!("--context must be at least 1");
    }
    let mut configs = Vec::new();
    for &layers in SWEEP_LAYERS {
        let (lo, hi) = (SWEEP_ASPECT.0 * layers, SWEEP_ASPECT.1 * layers);
        for hidden in (lo.div_ceil(128) * 128..=hi).step_by(128) {
            let heads = hidden / 128;
            let kv_heads = options.kv_heads.map_or(heads, |kv| kv.min(heads));
            if !heads.is_multiple_of(kv_heads) {
                continue;
            }
            let arch = from_dims(&Dims {
                hidden: Some(hidden),
                layers: Some(layers),
                heads: Some(heads),
                kv_heads: Some(kv_heads),
                intermediate: Some(llama_intermediate(hidden)),
                vocab: Some(options.vocab),
                head_dim: Some(128),
                tied: options.tied,
                ..Dims::default()
            })?;
            let params = arch.params().total;
            let deviation = params as f64 / budget - 1.0;
            if deviation > SWEEP_TOLERANCE {
                break;
            }
            if deviation < -SWEEP_TOLERANCE {
                continue;
            }
            let (matmul, attention) = arch.decode_flops(options.context);
            configs.push(SweepRow {
                layers,
                hidden,
                heads,
                kv_heads,
                head_dim: 128,
                intermediate: arch.ffn.intermediate,
                params,
                deviation,
                flops_per_token: matmul + attention,
                kv_bytes_per_token: arch.kv_elements_per_layer()
                    * options.kv_dtype.bytes()
                    * layers,
            });
        }
    }
    if configs.is_empty() {
        bail!(
            "no Llama-style config (hidden a multiple of 128, head_dim 128, {}–{} layers, hidden/layers {}–{}) has {} parameters within ±{:.0}%",
            SWEEP_LAYERS[0],
            SWEEP_LAYERS[SWEEP_LAYERS.len() - 1],
            SWEEP_ASPECT.0,
            SWEEP_ASPECT.1,
            count(budget),
            SWEEP_TOLERANCE * 100.0
        );
    }
    Ok(Sweep {
        budget,
        tolerance: SWEEP_TOLERANCE,
        vocab: options.vocab,
        kv_heads: options.kv_heads,
        tied: options.tied,
        context: options.context,
        kv_dtype: options.kv_dtype,
        configs,
    })
}

impl Sweep {
    pub fn table(&self) -> String {
        let mut out = format!(
            "Llama-style configs with {} parameters ±{:.0}% (vocab {}, head_dim 128, {}, {}; FLOPs at context {}, KV cache {})\n\n",
            count(self.budget),
            self.tolerance * 100.0,
            self.vocab,
            match self.kv_heads {
                Some(kv) => format!("{kv} KV heads"),
                None => "one KV head per head".to_string(),
            },
            if self.tied { "tied" } else { "untied" },
            self.context,
            self.kv_dtype
        );
        let _ = writeln!(
            out,
            "{:>6} {:>7} {:>6} {:>4} {:>12} {:>18} {:>7} {:>14} {:>11}",
            "layers",
            "hidden",
            "heads",
            "kv",
            "intermediate",
            "parameters",
            "Δ",
            "FLOPs/token",
            "KV/token"
        );
        for r in &self.configs {
            let _ = writeln!(
                out,
                "{:>6} {:>7} {:>6} {:>4} {:>12} {:>18} {:>+6.1}% {:>14} {:>11}",
                r.layers,
                r.hidden,
                r.heads,
                r.kv_heads,
                r.intermediate,
                group(r.params),
                r.deviation * 100.0,
                flops(r.flops_per_token),
                bytes(r.kv_bytes_per_token as f64)
            );
        }
        out
    }
}

// ── Number formatting ─────────────────────────────────────────────────────────────────────

/// `6738415616` → `6,738,415,616`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() * 4 / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `6.74e9` → `6.74 B`.
fn count(x: f64) -> String {
    scaled(x, 1000.0, &["", " K", " M", " B", " T", " Q"])
}

fn flops(x: f64) -> String {
    scaled(
        x,
        1000.0,
        &[
            " FLOP", " kFLOP", " MFLOP", " GFLOP", " TFLOP", " PFLOP", " EFLOP", " ZFLOP",
        ],
    )
}

fn bytes(x: f64) -> String {
    scaled(x, 1024.0, &[" B", " KiB", " MiB", " GiB", " TiB", " PiB"])
}

fn scaled(mut x: f64, base: f64, units: &[&str]) -> String {
    let mut unit = 0;
    while x.abs() >= base && unit + 1 < units.len() {
        x /= base;
        unit += 1;
    }
    if unit == 0 && x.fract() == 0.0 {
        format!("{x:.0}{}", units[0])
    } else {
        format!("{x:.2}{}", units[unit])
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use serde_json::{Map, Value};

    fn repo() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn published(name: &str) -> Arch {
        read_config(&repo().join("tests/fixtures/configs").join(name))
            .unwrap()
            .0
    }

    fn near(got: u64, want: f64, rel_tol: f64) -> bool {
        (got as f64 - want).abs() <= rel_tol * want
    }

    fn parse(json: &str) -> anyhow::Result<Arch> {
        from_config(json).map(|(arch, _)| arch)
    }

    fn error(json: &str) -> String {
        format!("{:#}", parse(json).unwrap_err())
    }

    const LLAMA: &str = r#"{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "vocab_size": 384}"#;

    fn llama_with(key: &str, value: &str) -> String {
        let mut v: Value = serde_json::from_str(LLAMA).unwrap();
        v[key] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    // ── Published parameter counts

    #[test]
    fn llama_2_7b_has_6_738_415_616_parameters() {
        let p = published("Llama-2-7b-hf.json").params();
        assert_eq!(p.total, 6_738_415_616);
        assert_eq!(p.active, p.total);
        assert_eq!(p.embedding, 131_072_000);
        assert_eq!(p.lm_head, 131_072_000);
        assert_eq!(p.attention, 32 * 4 * 4096 * 4096);
        assert_eq!(p.ffn, 32 * 3 * 4096 * 11008);
        assert_eq!(p.norms, 65 * 4096);
    }

    #[test]
    fn mistral_7b_has_7_241_732_096_parameters() {
        let arch = published("Mistral-7B-v0.1.json");
        assert_eq!(arch.params().total, 7_241_732_096);
        assert_eq!(arch.attention_kind(), "gqa");
    }

    #[test]
    fn mixtral_8x7b_has_46_7b_total_and_12_9b_active_parameters() {
        let p = published("Mixtral-8x7B-v0.1.json").params();
        assert_eq!(p.total, 46_702_792_704);
        assert!(near(p.active, 12.9e9, 0.005), "active {}", p.active);
        assert_eq!(p.experts, 32 * 8 * 3 * 4096 * 14336);
        assert_eq!(p.ffn, 32 * 8 * 4096, "the routers");
    }

    #[test]
    fn gpt2_has_124_439_808_parameters_with_tied_embeddings() {
        let arch = published("gpt2.json");
        assert!(
            arch.tied,
            "gpt2's config has no tie_word_embeddings: tied by default"
        );
        let p = arch.params();
        assert_eq!(p.total, 124_439_808);
        assert_eq!(p.lm_head, 0);
        assert_eq!(p.embedding, (50257 + 1024) * 768);
    }

    #[test]
    fn tinyllama_has_1_100_048_384_parameters() {
        assert_eq!(
            published("TinyLlama-1.1B-Chat-v1.0.json").params().total,
            1_100_048_384
        );
    }

    #[test]
    fn qwen2_7b_has_7_62b_parameters() {
        let p = published("Qwen2-7B.json").params();
        assert!(near(p.total, 7.62e9, 0.005), "{}", p.total);
    }

    #[test]
    fn gemma_7b_has_8_54b_parameters() {
        let arch = published("gemma-7b.json");
        assert!(arch.tied);
        assert!(near(arch.params().total, 8.54e9, 0.005));
    }

    #[test]
    fn bloom_560m_has_559_214_592_parameters() {
        assert_eq!(published("bloom-560m.json").params().total, 559_214_592);
    }

    #[test]
    fn pythia_160m_has_162_322_944_parameters() {
        assert_eq!(published("pythia-160m.json").params().total, 162_322_944);
    }

    #[test]
    fn deepseek_v2_lite_has_15_7b_parameters_and_caches_the_latent() {
        let arch = published("DeepSeek-V2-Lite.json");
        let p = arch.params();
        assert!(near(p.total, 15.7e9, 0.005), "{}", p.total);
        assert_eq!(
            arch.moe.unwrap().layers,
            26,
            "first_k_dense_replace 1 of 27"
        );
        // 2.4B activated, as DeepSeek counts them: without the input embedding
        assert!(
            near(p.active - p.embedding, 2.4e9, 0.03),
            "{}",
            p.active - p.embedding
        );
        assert_eq!(arch.kv_elements_per_layer(), 512 + 64);
    }

    // ── Every model_type against a real checkpoint: the tiny fixtures' safetensors headers

    /// Elements stored in a safetensors file, from its header.
    fn stored_parameters(path: &Path) -> u64 {
        let data = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
        let header: Map<String, Value> = serde_json::from_slice(&data[8..8 + n]).unwrap();
        header
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .map(|(_, t)| {
                t["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .product::<u64>()
            })
            .sum()
    }

    #[test]
    fn every_fixture_checkpoint_stores_exactly_the_counted_parameters() {
        let mut types = std::collections::BTreeSet::new();
        let mut checked = 0;
        for entry in std::fs::read_dir(repo().join("tests/fixtures")).unwrap() {
            let dir = entry.unwrap().path();
            let weights = dir.join("model.safetensors");
            let config = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
            // Packed quantized checkpoints store several int32 words per group of weights.
            if !weights.is_file() || config.contains("\"quantization_config\"") {
                continue;
            }
            let arch = read_config(&dir.join("config.json")).unwrap().0;
            let p = arch.params();
            assert_eq!(
                p.total,
                stored_parameters(&weights),
                "{} ({})",
                dir.display(),
                arch.model_type
            );
            assert_eq!(
                p.embedding + p.attention + p.ffn + p.experts + p.norms + p.lm_head,
                p.total
            );
            types.insert(arch.model_type);
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} fixtures");
        // transformers cannot write Falcon's pre-transformers forms; tests/configs.rs reads
        // them against the falcon fixtures.
        let missing: Vec<_> = vibee_core::config::families::model_types()
            .into_iter()
            .filter(|t| !types.contains(*t) && !t.starts_with("RefinedWeb"))
            .collect();
        assert!(missing.is_empty(), "no fixture for {missing:?}");
    }

    #[test]
    fn moe_fixtures_count_active_parameters() {
        let dir = repo().join("tests/fixtures");
        // qwen2_moe: 4 experts of 32, top-2, in both layers
        let p = read_config(&dir.join("qwen2_moe/config.json"))
            .unwrap()
            .0
            .params();
        assert_eq!(p.total - p.active, 2 * 2 * 3 * 64 * 32);
        // deepseek_v2: layer 0 dense, layer 1 with 4 experts of 32, top-2
        let p = read_config(&dir.join("deepseek_v2/config.json"))
            .unwrap()
            .0
            .params();
        assert_eq!(p.experts, 4 * 3 * 64 * 32);
        assert_eq!(p.total - p.active, 2 * 3 * 64 * 32);
    }

    // ── FLOPs, KV cache, memory, Chinchilla

    #[test]
    fn decode_flops_are_twice_the_matmul_weights_plus_attention_at_the_context() {
        let arch = published("Llama-2-7b-hf.json");
        let matmul = 6_738_415_616 - 131_072_000 - 65 * 4096; // no embedding lookup, no norms
        assert_eq!(arch.active_matmul_params(), matmul);
        let (m, a) = arch.decode_flops(2048);
        assert_eq!(m, 2.0 * matmul as f64);
        assert_eq!(a, (32 * 2 * 32 * 2048 * 256) as f64);
        let (pm, pa) = arch.prefill_flops(4);
        assert_eq!(pm, 4.0 * m);
        assert_eq!(pa, (32 * 2 * 32 * 256 * (1 + 2 + 3 + 4)) as f64);
    }

    #[test]
    fn mixtral_decode_flops_count_only_the_active_experts() {
        let arch = published("Mixtral-8x7B-v0.1.json");
        let p = arch.params();
        let non_matmul = p.embedding + p.norms;
        assert_eq!(arch.active_matmul_params(), p.active - non_matmul);
    }

    #[test]
    fn kv_cache_bytes_per_token() {
        let options = Options::default();
        let llama = report(&published("Llama-2-7b-hf.json"), "llama", &options).unwrap();
        assert_eq!(llama.kv_cache.bytes_per_token, 512 * 1024);
        assert_eq!(llama.kv_cache.bytes_per_token_per_layer, 16 * 1024);
        let mistral = report(
            &published("Mistral-7B-v0.1.json"),
            "mistral",
            &Options {
                kv_dtype: Dtype::Int8,
                ..options.clone()
            },
        )
        .unwrap();
        assert_eq!(mistral.kv_cache.bytes_per_token, 64 * 1024);
        let lite = report(&published("DeepSeek-V2-Lite.json"), "ds", &options).unwrap();
        assert_eq!(lite.kv_cache.bytes_per_token, 27 * 576 * 2);
    }

    #[test]
    fn memory_is_weights_plus_the_kv_cache_of_the_batch() {
        let options = Options {
            batch: 4,
            context: 4096,
            dtype: Dtype::F16,
            kv_dtype: Dtype::F32,
            ..Options::default()
        };
        let r = report(&published("Llama-2-7b-hf.json"), "llama", &options).unwrap();
        assert_eq!(r.memory.weight_bytes, 2 * 6_738_415_616);
        assert_eq!(r.memory.kv_cache_bytes, 4 * 4096 * 1024 * 1024);
        assert_eq!(
            r.memory.total_bytes,
            r.memory.weight_bytes + r.memory.kv_cache_bytes
        );
    }

    #[test]
    fn chinchilla_is_20_tokens_per_parameter() {
        let r = report(
            &published("Llama-2-7b-hf.json"),
            "llama",
            &Options::default(),
        )
        .unwrap();
        assert_eq!(r.chinchilla.optimal_tokens, 20.0 * 6_738_415_616.0);
        // Chinchilla itself: 5.76e23 FLOPs → about 70B parameters on 1.4T tokens
        let b = compute_optimal(5.76e23).unwrap();
        assert!((b.params / 69.3e9 - 1.0).abs() < 0.01, "{}", b.params);
        assert!((6.0 * b.params * b.tokens / 5.76e23 - 1.0).abs() < 1e-12);
        assert_eq!(b.tokens, 20.0 * b.params);
    }

    // ── Sweep

    #[test]
    fn sweep_at_7b_finds_the_llama_2_7b_shape() {
        let s = sweep(&SweepOptions::default()).unwrap();
        let row = s
            .configs
            .iter()
            .find(|r| r.layers == 32 && r.hidden == 4096)
            .expect("32 × 4096 is within 10% of 7B");
        assert_eq!(row.params, 6_738_415_616);
        assert_eq!(row.intermediate, 11008);
        assert_eq!(row.kv_bytes_per_token, 512 * 1024);
        for r in &s.configs {
            assert!(r.deviation.abs() <= 0.10, "{r:?}");
            assert_eq!(r.hidden % 128, 0);
            assert_eq!(r.intermediate % 256, 0);
            assert_eq!(r.heads * 128, r.hidden);
        }
        let layers: std::collections::BTreeSet<_> = s.configs.iter().map(|r| r.layers).collect();
        assert!(layers.len() >= 3, "{layers:?}");
    }

    #[test]
    fn sweep_with_kv_heads_uses_grouped_query_attention() {
        let s = sweep(&SweepOptions {
            kv_heads: Some(8),
            ..SweepOptions::default()
        })
        .unwrap();
        assert!(s.configs.iter().all(|r| r.kv_heads == 8.min(r.heads)));
    }

    #[test]
    fn llama_intermediate_rounds_8_thirds_up_to_256() {
        assert_eq!(llama_intermediate(4096), 11008);
        assert_eq!(llama_intermediate(2048), 5632);
        assert_eq!(llama_intermediate(128), 512);
    }

    #[test]
    fn an_impossible_sweep_budget_is_an_error() {
        let e = sweep(&SweepOptions {
            budget: 1000.0,
            ..SweepOptions::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("within ±10%"), "{e}");
        assert!(sweep(&SweepOptions {
            budget: f64::NAN,
            ..SweepOptions::default()
        })
        .is_err());
    }

    // ── Flags

    #[test]
    fn flags_describe_a_llama_style_decoder() {
        let arch = from_dims(&Dims {
            hidden: Some(4096),
            layers: Some(32),
            heads: Some(32),
            kv_heads: Some(32),
            intermediate: Some(11008),
            vocab: Some(32000),
            ..Dims::default()
        })
        .unwrap();
        assert_eq!(arch.params().total, 6_738_415_616);
        let mixtral = from_dims(&Dims {
            hidden: Some(4096),
            layers: Some(32),
            heads: Some(32),
            kv_heads: Some(8),
            intermediate: Some(14336),
            vocab: Some(32000),
            experts: Some(8),
            experts_per_token: Some(2),
            ..Dims::default()
        })
        .unwrap();
        assert_eq!(
            mixtral.params(),
            published("Mixtral-8x7B-v0.1.json").params()
        );
        let tied = from_dims(&Dims {
            hidden: Some(2048),
            layers: Some(22),
            heads: Some(32),
            kv_heads: Some(4),
            intermediate: Some(5632),
            vocab: Some(32000),
            tied: true,
            ..Dims::default()
        })
        .unwrap();
        assert_eq!(tied.params().total, 1_100_048_384 - 32000 * 2048);
    }

    #[test]
    fn flag_errors_name_the_flag() {
        let full = Dims {
            hidden: Some(64),
            layers: Some(2),
            heads: Some(4),
            intermediate: Some(128),
            vocab: Some(384),
            ..Dims::default()
        };
        let err = |d: Dims| format!("{:#}", from_dims(&d).unwrap_err());
        assert!(err(Dims {
            hidden: None,
            ..full.clone()
        })
        .contains("--hidden is missing"));
        assert!(err(Dims {
            heads: Some(0),
            ..full.clone()
        })
        .contains("--heads must be at least 1"));
        assert!(err(Dims {
            kv_heads: Some(3),
            ..full.clone()
        })
        .contains("3 key/value heads cannot serve 4 attention heads"));
        assert!(err(Dims {
            experts: Some(8),
            ..full.clone()
        })
        .contains("--experts needs --experts-per-token"));
        assert!(err(Dims {
            experts: Some(2),
            experts_per_token: Some(3),
            ..full.clone()
        })
        .contains("3 experts per token, but only 2 experts"));
        assert!(err(Dims {
            hidden: Some(65),
            ..full.clone()
        })
        .contains("not divisible by 4 attention heads"));
        assert!(from_dims(&Dims {
            hidden: Some(65),
            head_dim: Some(16),
            ..full
        })
        .is_ok());
    }

    // ── Config errors: clear messages, never panics

    #[test]
    fn a_missing_config_file_is_an_error() {
        let e = read_config(Path::new("/nonexistent/config.json")).unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot read /nonexistent/config.json"),
            "{e:#}"
        );
    }

    #[test]
    fn malformed_json_is_an_error_naming_the_file() {
        let path = std::env::temp_dir().join(format!("arch-calc-bad-{}.json", std::process::id()));
        std::fs::write(&path, "{\"model_type\": \"llama\",").unwrap();
        let e = format!("{:#}", read_config(&path).unwrap_err());
        std::fs::remove_file(&path).unwrap();
        assert!(e.contains("is not valid JSON"), "{e}");
        assert!(e.contains("arch-calc-bad"), "{e}");
    }

    #[test]
    fn a_config_that_is_not_an_object_is_an_error() {
        assert!(error("[1, 2]").contains("the top level must be an object"));
    }

    #[test]
    fn a_missing_or_unknown_model_type_is_an_error() {
        assert!(error(r#"{"hidden_size": 64}"#).contains("missing required key `model_type`"));
        let e = error(r#"{"model_type": "mamba"}"#);
        assert!(e.contains("model_type `mamba` is not supported"), "{e}");
        assert!(e.contains("deepseek_v2"), "{e}");
        assert!(error(r#"{"model_type": 7}"#).contains("`model_type` must be a string"));
    }

    #[test]
    fn a_missing_key_is_named() {
        let mut v: Value = serde_json::from_str(LLAMA).unwrap();
        v.as_object_mut().unwrap().remove("intermediate_size");
        assert_eq!(
            error(&v.to_string()),
            "config.json: missing required key `intermediate_size`"
        );
        // GPT-2's own spelling is read as the common key.
        let e = error(r#"{"model_type": "gpt2", "n_head": 4}"#);
        assert_eq!(e, "config.json: missing required key `hidden_size`");
        let e = error(
            r#"{"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 384,
            "num_experts_per_tok": 2}"#,
        );
        assert_eq!(e, "config.json: missing required key `num_local_experts`");
    }

    #[test]
    fn keys_run_would_refuse_are_warnings_here() {
        let (arch, unknown) = from_config(&llama_with("attn_temperature", "0.5")).unwrap();
        assert_eq!(arch.hidden, 64);
        assert_eq!(unknown, ["attn_temperature"]);
    }

    #[test]
    fn zero_heads_is_an_error() {
        assert_eq!(
            error(&llama_with("num_attention_heads", "0")),
            "config.json: `num_attention_heads` must be positive"
        );
        assert!(error(&llama_with("num_key_value_heads", "0")).contains("multiple of"));
    }

    #[test]
    fn a_wrongly_typed_value_is_an_error() {
        assert_eq!(
            error(&llama_with("hidden_size", "\"big\"")),
            "config.json: `hidden_size` must be a non-negative integer, got \"big\""
        );
        assert!(error(&llama_with("hidden_size", "-64")).contains("non-negative integer"));
        assert!(error(&llama_with("hidden_size", "64.5")).contains("non-negative integer"));
        assert!(
            error(&llama_with("tie_word_embeddings", "\"yes\"")).contains("must be true or false")
        );
        // an integral float is a count
        assert_eq!(
            parse(&llama_with("hidden_size", "64.0")).unwrap().hidden,
            64
        );
    }

    #[test]
    fn inconsistent_heads_are_an_error() {
        for kv in ["3", "8"] {
            let e = error(&llama_with("num_key_value_heads", kv));
            assert!(
                e.contains(&format!("multiple of num_key_value_heads ({kv})")),
                "{e}"
            );
        }
        assert!(error(&llama_with("hidden_size", "66")).contains("not a multiple"));
        // an explicit head_dim needs no divisibility
        assert!(parse(
            &llama_with("hidden_size", "66")
                .replace("\"model_type\"", "\"head_dim\": 16, \"model_type\"")
        )
        .is_ok());
    }

    #[test]
    fn too_many_experts_per_token_is_an_error() {
        let mut v: Value = serde_json::from_str(LLAMA).unwrap();
        v["model_type"] = "mixtral".into();
        v["num_local_experts"] = 2.into();
        v["num_experts_per_tok"] = 4.into();
        assert!(error(&v.to_string())
            .contains("num_experts_per_tok (4) must be between 1 and the number of experts (2)"));
    }

    #[test]
    fn a_bad_mlp_only_layers_list_is_an_error() {
        let text = std::fs::read_to_string(repo().join("tests/fixtures/qwen2_moe/config.json"))
            .unwrap()
            .replace("\"mlp_only_layers\": []", "\"mlp_only_layers\": [\"x\"]");
        assert!(error(&text).contains("`mlp_only_layers` must be a list of layer indices"));
    }

    #[test]
    fn options_must_be_positive() {
        let arch = published("gpt2.json");
        for options in [
            Options {
                context: 0,
                ..Options::default()
            },
            Options {
                batch: 0,
                ..Options::default()
            },
            Options {
                prompt: 0,
                ..Options::default()
            },
            Options {
                flops_budget: Some(-1.0),
                ..Options::default()
            },
        ] {
            let e = report(&arch, "gpt2", &options).unwrap_err().to_string();
            assert!(e.starts_with("--"), "{e}");
        }
    }

    #[test]
    fn quantities_and_dtypes_parse() {
        assert_eq!(parse_quantity("7e9"), Ok(7e9));
        assert_eq!(parse_quantity("7B"), Ok(7e9));
        assert_eq!(parse_quantity("125m"), Ok(125e6));
        assert_eq!(parse_quantity("1.5T"), Ok(1.5e12));
        assert_eq!(parse_quantity("10_000"), Ok(1e4));
        assert!(parse_quantity("seven")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_quantity("0").unwrap_err().contains("positive"));
        assert!(parse_quantity("").is_err());
        assert_eq!("bf16".parse(), Ok(Dtype::Bf16));
        assert_eq!("INT8".parse(), Ok(Dtype::Int8));
        assert!("q4"
            .parse::<Dtype>()
            .unwrap_err()
            .contains("use f32, f16, bf16 or int8"));
    }

    #[test]
    fn report_table_and_json_agree() {
        let r = report(
            &published("Mixtral-8x7B-v0.1.json"),
            "Mixtral-8x7B-v0.1.json",
            &Options {
                flops_budget: Some(1e23),
                ..Options::default()
            },
        )
        .unwrap();
        let table = r.table();
        assert!(table.contains("46,702,792,704"), "{table}");
        assert!(table.contains("8 experts × 14336, top-2"), "{table}");
        assert!(
            table.contains("compute-optimal at 1.000e23 FLOPs"),
            "{table}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["params"]["total"], 46_702_792_704u64);
        assert_eq!(json["kv_cache"]["dtype"], "bf16");
        assert_eq!(json["model"]["attention"], "gqa");
    }

    #[test]
    fn numbers_are_grouped_and_scaled() {
        assert_eq!(group(6_738_415_616), "6,738,415,616");
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(count(6.738e9), "6.74 B");
        assert_eq!(bytes(524_288.0), "512.00 KiB");
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(flops(1.4e10), "14.00 GFLOP");
    }
}
