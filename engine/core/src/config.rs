//! `config.json` of a Hugging Face checkpoint, parsed into the fields vibee's operators need.
//!
//! Both published forms are read: transformers 4.x (`rope_theta`, `rope_scaling`,
//! `torch_dtype`) and 5.x (`rope_parameters`, `dtype`). A key that would change the model's
//! output and that vibee does not understand is an error naming it, never a silent default.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("config.json is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("config.json: {0}")]
    Invalid(String),
    #[error(
        "config.json: model_type `{0}` is not supported (supported: {SUPPORTED_MODEL_TYPES:?})"
    )]
    UnknownModelType(String),
    #[error("config.json: key `{key}` is not understood by vibee for model_type `{model_type}`; refusing to guess its meaning")]
    UnknownKey { key: String, model_type: String },
}

pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "olmo2",
    "starcoder2",
    "mixtral",
    "qwen2_moe",
    "gpt_neox",
    "falcon",
    "bloom",
    "gpt2",
    "phi3",
    "deepseek_v2",
    "smollm3",
];

/// Config keys some families spell differently, read under the Llama spelling.
const RENAMED_KEYS: &[(&str, &str, &str)] = &[
    ("falcon", "num_kv_heads", "num_key_value_heads"),
    ("falcon", "layer_norm_epsilon", "rms_norm_eps"),
    ("falcon", "ffn_hidden_size", "intermediate_size"),
    ("falcon", "activation", "hidden_act"),
    ("gpt_neox", "layer_norm_eps", "rms_norm_eps"),
    ("gpt_neox", "rotary_pct", "partial_rotary_factor"),
    ("gpt_neox", "rotary_emb_base", "rope_theta"),
    ("bloom", "n_head", "num_attention_heads"),
    ("bloom", "n_layer", "num_hidden_layers"),
    ("bloom", "layer_norm_epsilon", "rms_norm_eps"),
    ("gpt2", "n_embd", "hidden_size"),
    ("gpt2", "n_head", "num_attention_heads"),
    ("gpt2", "n_layer", "num_hidden_layers"),
    ("gpt2", "n_positions", "max_position_embeddings"),
    ("gpt2", "n_inner", "intermediate_size"),
    ("gpt2", "layer_norm_epsilon", "rms_norm_eps"),
    ("gpt2", "activation_function", "hidden_act"),
];

/// Training-only settings of single families.
const FAMILY_INERT_KEYS: &[(&str, &str)] = &[("phi3", "embd_pdrop"), ("phi3", "resid_pdrop")];

/// Keys that do not change a forward pass.
const INERT_KEYS: &[&str] = &[
    "_name_or_path",
    "architectures",
    "attention_dropout",
    "initializer_range",
    "pad_token_id",
    "pretraining_tp",
    "transformers_version",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "is_decoder",
    "tokenizer_class",
    // Training-only settings.
    "embedding_dropout",
    "residual_dropout",
    "hidden_dropout",
    "classifier_dropout",
    "router_aux_loss_coef",
    "router_jitter_noise",
    "output_router_logits",
];

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    Dynamic {
        factor: f64,
        original_max_position_embeddings: usize,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN: frequencies blended between interpolated and extrapolated by a linear ramp over the
    /// dimensions, cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
        attention_factor: f64,
        softmax_mscale: f64,
    },
    /// Per-frequency rescaling, `short` within the trained length and `long` past it, with
    /// cos/sin scaled by `attention_factor` (Phi-3).
    LongRope {
        short: Vec<f64>,
        long: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub hidden_act: String,
    pub position: PositionKind,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint declares (`torch_dtype` or `dtype`), if any.
    pub dtype: Option<String>,
    /// Learned biases on the q, k and v projections (Qwen2, StarCoder2).
    pub qkv_bias: bool,
    /// A learned bias on the attention output projection (StarCoder2, GPT-NeoX).
    pub o_bias: bool,
    /// Leading dimensions of each head that the rotary embedding turns (GPT-NeoX: a quarter).
    pub rotary_dim: usize,
    /// Where the family keeps its tensors.
    pub layout: Layout,
    /// RMSNorm of queries and keys before the rotary embedding (Qwen3, OLMo 2).
    pub qk_norm: Option<QkNormScope>,
    /// Per layer, the sliding attention window, if that layer has one (Mistral, Qwen2).
    pub sliding_layers: Vec<Option<usize>>,
    pub norm: NormKind,
    /// Where the norms sit around each sub-layer and how residuals add up.
    pub residual: Residual,
    pub ffn: FfnKind,
    /// Feed-forward layers that route each token to a few experts (Mixtral, Qwen2-MoE).
    pub moe: Option<MoeConfig>,
    /// Multi-head latent attention (DeepSeek-V2): its ranks and head widths.
    pub mla: Option<MlaConfig>,
    /// Rotary pairs are adjacent dimensions `(2i, 2i+1)` (DeepSeek) rather than the two halves.
    pub rope_interleaved: bool,
    /// The quantization plugin the stored weights need (`gguf` for GGUF block types).
    pub quantization: Option<&'static str>,
    /// Per layer: attend with no position encoding at all (NoPE; SmolLM3's `no_rope_layers`).
    pub nope_layers: Vec<bool>,
    /// Attention scores pass through `cap · tanh(score / cap)` (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Final logits pass through `cap · tanh(logit / cap)` (Gemma 2).
    pub final_softcap: Option<f64>,
    /// Queries are scaled by `1/√query_pre_attn_scalar` instead of `1/√head_dim` (Gemma 2).
    pub query_pre_attn_scalar: Option<f64>,
    /// Embeddings are multiplied by this (Gemma: √hidden_size).
    pub embedding_scale: Option<f32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkNormScope {
    /// One gain of `head_dim` shared by every head (Qwen3).
    PerHead,
    /// One gain over the whole projection (OLMo 2).
    Whole,
}

/// The places a layer can normalise: the input or output of its attention or feed-forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormSite {
    AttnIn,
    AttnOut,
    FfnIn,
    FfnOut,
}

/// How a layer arranges its norms and residual connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residual {
    /// `x + attn(norm(x))`, then `h + ffn(norm(h))` (Llama).
    PreNorm,
    /// Norms before and after each sub-layer (Gemma 2).
    Sandwich,
    /// `x + norm(attn(x))`, then `h + norm(ffn(h))` (OLMo 2).
    PostNorm,
    /// `x + attn(norm(x)) + ffn(norm'(x))` (GPT-NeoX, Falcon).
    Parallel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionKind {
    /// Rotary embeddings of queries and keys.
    Rope,
    /// Linear biases on attention scores (BLOOM).
    Alibi,
    /// A learned embedding per absolute position, added to the token embeddings (GPT-2).
    Learned,
}

/// How the q, k and v projections are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkvLayout {
    /// `q_proj`, `k_proj`, `v_proj`.
    Separate,
    /// One fused matrix whose rows are all queries, then all keys, then all values (GPT-2).
    Concat(&'static str),
    /// One fused matrix whose rows hold, per key/value head, its query heads, its key and its
    /// value: `[q, k, v]` per head for GPT-NeoX, `[q × heads/kv_heads, k, v]` for Falcon.
    Fused(&'static str),
}

/// The tensor names of a family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub embed: &'static str,
    /// A norm applied to the embeddings (BLOOM).
    pub embed_norm: Option<&'static str>,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
    /// Layer `i` lives under `{layers}.{i}`.
    pub layers: &'static str,
    pub attention: &'static str,
    pub qkv: QkvLayout,
    pub o_proj: &'static str,
    /// The plain MLP's input and output projections.
    pub mlp_in: &'static str,
    pub mlp_out: &'static str,
    /// The learned position table (GPT-2).
    pub position_embed: Option<&'static str>,
    /// Linear weights are stored `[in, out]` (GPT-2's Conv1D) rather than `[out, in]`.
    pub transposed: bool,
    /// The gated feed-forward's gate and up projections fused, gate rows first (Phi-3).
    pub gate_up: Option<&'static str>,
}

impl Layout {
    pub fn of(family: &str) -> Self {
        let llama = Layout {
            embed: "model.embed_tokens",
            embed_norm: None,
            final_norm: "model.norm",
            lm_head: "lm_head",
            layers: "model.layers",
            attention: "self_attn",
            qkv: QkvLayout::Separate,
            o_proj: "o_proj",
            mlp_in: "c_fc",
            mlp_out: "c_proj",
            position_embed: None,
            transposed: false,
            gate_up: None,
        };
        match family {
            "phi3" => Layout {
                qkv: QkvLayout::Concat("qkv_proj"),
                gate_up: Some("gate_up_proj"),
                ..llama
            },
            "gpt2" => Layout {
                embed: "transformer.wte",
                position_embed: Some("transformer.wpe"),
                final_norm: "transformer.ln_f",
                layers: "transformer.h",
                attention: "attn",
                qkv: QkvLayout::Concat("c_attn"),
                o_proj: "c_proj",
                transposed: true,
                ..llama
            },
            "bloom" => Layout {
                embed: "transformer.word_embeddings",
                embed_norm: Some("transformer.word_embeddings_layernorm"),
                final_norm: "transformer.ln_f",
                layers: "transformer.h",
                attention: "self_attention",
                qkv: QkvLayout::Fused("query_key_value"),
                o_proj: "dense",
                mlp_in: "dense_h_to_4h",
                mlp_out: "dense_4h_to_h",
                ..llama
            },
            "gpt_neox" => Layout {
                embed: "gpt_neox.embed_in",
                embed_norm: None,
                final_norm: "gpt_neox.final_layer_norm",
                lm_head: "embed_out",
                layers: "gpt_neox.layers",
                attention: "attention",
                qkv: QkvLayout::Fused("query_key_value"),
                o_proj: "dense",
                mlp_in: "dense_h_to_4h",
                mlp_out: "dense_4h_to_h",
                position_embed: None,
                transposed: false,
                gate_up: None,
            },
            "falcon" => Layout {
                embed: "transformer.word_embeddings",
                final_norm: "transformer.ln_f",
                layers: "transformer.h",
                attention: "self_attention",
                qkv: QkvLayout::Fused("query_key_value"),
                o_proj: "dense",
                mlp_in: "dense_h_to_4h",
                mlp_out: "dense_4h_to_h",
                ..llama
            },
            _ => llama,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlaConfig {
    /// Queries pass through a rank-`q_lora_rank` bottleneck, or one projection when `None`.
    pub q_lora_rank: Option<usize>,
    /// Width of the compressed key/value latent that the cache holds.
    pub kv_lora_rank: usize,
    /// Per-head query/key dimensions without position encoding.
    pub nope_dim: usize,
    /// Per-head query dimensions, and the shared key dimensions, that carry rotary positions.
    pub rope_dim: usize,
    pub v_dim: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Each expert is a SwiGLU of this width.
    pub expert_intermediate: usize,
    /// Renormalise the top-k routing probabilities to sum to one.
    pub normalize_top_k: bool,
    /// A shared expert every token also passes through (Qwen2-MoE, DeepSeek).
    pub shared_intermediate: Option<usize>,
    /// The shared expert's output is scaled by a learned sigmoid gate (Qwen2-MoE).
    pub shared_gate: bool,
    /// Routing weights are multiplied by this (DeepSeek's `routed_scaling_factor`).
    pub routed_scale: f32,
    /// Experts come in `groups`; each token picks its experts from its best `top_groups`
    /// groups (DeepSeek's `group_limited_greedy`).
    pub group_limit: Option<(usize, usize)>,
    /// Per layer: routed (true) or a dense SwiGLU of `intermediate_size` (false).
    pub sparse_layers: Vec<bool>,
    pub layout: MoeLayout,
}

/// How a family names its expert tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeLayout {
    /// `block_sparse_moe.{gate, experts.N.{w1, w2, w3}}`
    Mixtral,
    /// `mlp.{gate, experts.N.{gate,up,down}_proj, shared_expert.*, shared_expert_gate}`
    Qwen,
    /// `mlp.{gate, experts.N.{gate,up,down}_proj, shared_experts.*}`
    DeepSeek,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FfnKind {
    /// `down(act(gate x) · up x)`
    Gated,
    /// `proj(act(fc x))`, with or without biases.
    Plain { bias: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormKind {
    /// `x / rms(x) · w`
    Rms,
    /// `x / rms(x) · (1 + w)` (Gemma)
    RmsUnitOffset,
    /// `(x − mean) / std · w (+ b)`
    Layer { bias: bool },
}

/// A JSON object whose keys are ticked off as they are read, so leftovers can be reported.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    read: BTreeSet<&'a str>,
}

impl<'a> Fields<'a> {
    fn new(map: &'a Map<String, Value>) -> Self {
        Self {
            map,
            read: BTreeSet::new(),
        }
    }

    fn get(&mut self, key: &'a str) -> Option<&'a Value> {
        self.read.insert(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn usize(&mut self, key: &'a str) -> Result<Option<usize>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    invalid(format!("`{key}` must be a non-negative integer, got {v}"))
                })
            })
            .transpose()
    }

    fn required_usize(&mut self, key: &'a str) -> Result<usize, ConfigError> {
        match self.usize(key)? {
            Some(0) => Err(invalid(format!("`{key}` must be positive"))),
            Some(n) => Ok(n),
            None => Err(invalid(format!("missing required key `{key}`"))),
        }
    }

    fn f64(&mut self, key: &'a str) -> Result<Option<f64>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| invalid(format!("`{key}` must be a number, got {v}")))
            })
            .transpose()
    }

    fn bool(&mut self, key: &'a str) -> Result<Option<bool>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| invalid(format!("`{key}` must be true or false, got {v}")))
            })
            .transpose()
    }

    fn string(&mut self, key: &'a str) -> Result<Option<String>, ConfigError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| invalid(format!("`{key}` must be a string, got {v}")))
            })
            .transpose()
    }

    fn unread(&self, inert: &[&str]) -> Option<&'a str> {
        self.map
            .keys()
            .map(String::as_str)
            .find(|k| !self.read.contains(k) && !inert.contains(k))
    }
}

fn invalid(message: String) -> ConfigError {
    ConfigError::Invalid(message)
}

impl ModelConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let value: Value = serde_json::from_str(text)?;
        let original = value
            .as_object()
            .ok_or_else(|| invalid("the top level must be an object".into()))?;
        let family = original
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let map: Map<String, Value> = original
            .iter()
            .map(|(k, v)| {
                let renamed = RENAMED_KEYS
                    .iter()
                    .find(|(fam, from, _)| *fam == family && from == k);
                (
                    renamed.map_or(k.clone(), |(_, _, to)| to.to_string()),
                    v.clone(),
                )
            })
            .collect();
        let mut f = Fields::new(&map);
        let model_type = f
            .string("model_type")?
            .ok_or_else(|| invalid("missing required key `model_type`".into()))?;
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(ConfigError::UnknownModelType(model_type));
        }
        let hidden_size = f.required_usize("hidden_size")?;
        let num_heads = f.required_usize("num_attention_heads")?;
        let num_kv_heads = f.usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(invalid(format!(
                "num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match f.usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(invalid(format!(
                    "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads}) and no head_dim is given"
                )))
            }
        };
        let max_position_embeddings = f.usize("max_position_embeddings")?.unwrap_or(2048);
        let family = model_type.as_str();
        let (gemma, gemma2, olmo2, starcoder2) = (
            family == "gemma",
            family == "gemma2",
            family == "olmo2",
            family == "starcoder2",
        );
        // Qwen2 always biases its q/k/v projections and has no key saying so; StarCoder2's
        // `use_bias` puts biases on every projection.
        let all_bias = starcoder2 && f.bool("use_bias")?.unwrap_or(true);
        let (neox, falcon) = (family == "gpt_neox", family == "falcon");
        let (bloom, gpt2) = (family == "bloom", family == "gpt2");
        if bloom {
            if f.bool("apply_residual_connection_post_layernorm")? == Some(true) {
                return Err(invalid(
                    "bloom: `apply_residual_connection_post_layernorm: true` is not supported"
                        .into(),
                ));
            }
            // `slow_but_exact` only changes how tensor-parallel shards are merged.
            f.bool("slow_but_exact")?;
        }
        let position = if bloom {
            PositionKind::Alibi
        } else if gpt2 {
            PositionKind::Learned
        } else {
            PositionKind::Rope
        };
        if gpt2 {
            gpt2_flags(&mut f)?;
        }
        let family_bias = match family {
            "gpt_neox" => f.bool("attention_bias")?.unwrap_or(true),
            "bloom" | "gpt2" => true,
            "falcon" => f.bool("bias")?.unwrap_or(false),
            _ => all_bias,
        };
        let qkv_bias = match family {
            "qwen2" => true,
            "qwen2_moe" => f.bool("qkv_bias")?.unwrap_or(true),
            _ => family_bias,
        };
        let parallel = match family {
            "gpt_neox" => f.bool("use_parallel_residual")?.unwrap_or(true),
            "falcon" => falcon_layout(&mut f)?,
            _ => false,
        };
        for key in ["attention_bias", "mlp_bias"].into_iter().filter(|_| !neox) {
            if f.bool(key)? == Some(true) {
                return Err(invalid(format!(
                    "`{key}: true` (biases on every attention/MLP projection of model_type {family}) is not implemented by any vibee plugin yet"
                )));
            }
        }
        if f.bool("use_bidirectional_attention")? == Some(true) {
            return Err(invalid(
                "`use_bidirectional_attention: true` is not supported: vibee runs causal decoders"
                    .into(),
            ));
        }
        let num_layers = f.required_usize("num_hidden_layers")?;
        let sliding_layers = sliding_window(&mut f, family, num_layers)?;
        let (rope_theta, rope_scaling, rotary_factor) = rope(&mut f, max_position_embeddings)?;
        let quantization = quantization_config(&mut f)?;
        let rotary_dim = (head_dim as f64 * rotary_factor) as usize;
        let rotary_fits = rotary_dim > 0 && rotary_dim.is_multiple_of(2) && rotary_dim <= head_dim;
        if position == PositionKind::Rope && !rotary_fits {
            return Err(invalid(format!(
                "partial_rotary_factor {rotary_factor} gives {rotary_dim} rotary dimensions of {head_dim}: must be even and positive"
            )));
        }
        let dtype = match f.string("dtype")? {
            Some(d) => Some(d),
            None => f.string("torch_dtype")?,
        };
        let hidden_act = match f.string("hidden_act")? {
            Some(act) => act,
            None => f
                .string("hidden_activation")?
                .unwrap_or_else(|| "silu".into()),
        };
        let norm_eps = match f.f64("norm_epsilon")? {
            Some(eps) => eps,
            None => f.f64("rms_norm_eps")?.unwrap_or(1e-6),
        };
        let positive = |v: Option<f64>, key: &str| match v {
            Some(c) if c <= 0.0 => Err(invalid(format!("`{key}` must be positive"))),
            other => Ok(other),
        };
        let attn_softcap = positive(f.f64("attn_logit_softcapping")?, "attn_logit_softcapping")?;
        let final_softcap = positive(f.f64("final_logit_softcapping")?, "final_logit_softcapping")?;
        let query_pre_attn_scalar =
            positive(f.f64("query_pre_attn_scalar")?, "query_pre_attn_scalar")?;
        let moe = mixture_of_experts(&mut f, family, num_layers)?;
        let mla = latent_attention(&mut f, family, head_dim)?;
        let nope_layers = no_position_layers(&mut f, family, num_layers)?;
        let config = Self {
            hidden_size,
            // BLOOM's MLP is always four times as wide as the model, GPT-2's unless `n_inner`
            // says otherwise.
            intermediate_size: match f.usize("intermediate_size")? {
                _ if bloom => 4 * hidden_size,
                None if gpt2 => 4 * hidden_size,
                _ => f.required_usize("intermediate_size")?,
            },
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: f.required_usize("vocab_size")?,
            max_position_embeddings,
            rms_norm_eps: norm_eps,
            rope_theta,
            rope_scaling,
            // BLOOM's GELU is the tanh approximation and has no config key.
            hidden_act: if bloom {
                "gelu_pytorch_tanh".into()
            } else {
                hidden_act
            },
            position,
            tie_word_embeddings: f
                .bool("tie_word_embeddings")?
                .unwrap_or(gemma || gemma2 || starcoder2),
            bos_token_id: f.usize("bos_token_id")?.map(|id| id as u32),
            eos_token_ids: token_ids(f.get("eos_token_id"))?,
            dtype,
            qkv_bias,
            o_bias: family_bias,
            rotary_dim,
            layout: Layout::of(family),
            qk_norm: match family {
                "qwen3" => Some(QkNormScope::PerHead),
                "olmo2" => Some(QkNormScope::Whole),
                _ => None,
            },
            sliding_layers,
            norm: if gemma || gemma2 {
                NormKind::RmsUnitOffset
            } else if starcoder2 {
                NormKind::Layer { bias: all_bias }
            } else if neox || falcon || bloom || gpt2 {
                NormKind::Layer { bias: true }
            } else {
                NormKind::Rms
            },
            residual: if gemma2 {
                Residual::Sandwich
            } else if olmo2 {
                Residual::PostNorm
            } else if parallel {
                Residual::Parallel
            } else {
                Residual::PreNorm
            },
            ffn: if starcoder2 {
                FfnKind::Plain { bias: all_bias }
            } else if neox || bloom || gpt2 {
                FfnKind::Plain { bias: true }
            } else if falcon {
                FfnKind::Plain { bias: family_bias }
            } else {
                FfnKind::Gated
            },
            moe,
            mla,
            rope_interleaved: family == "deepseek_v2",
            quantization,
            nope_layers,
            attn_softcap,
            final_softcap,
            query_pre_attn_scalar,
            embedding_scale: (gemma || gemma2).then(|| (hidden_size as f64).sqrt() as f32),
            model_type,
        };
        let inert: Vec<&str> = INERT_KEYS
            .iter()
            .copied()
            .chain(
                FAMILY_INERT_KEYS
                    .iter()
                    .filter(|(fam, _)| *fam == config.model_type)
                    .map(|(_, k)| *k),
            )
            .collect();
        if let Some(key) = f.unread(&inert) {
            return Err(ConfigError::UnknownKey {
                key: key.to_string(),
                model_type: config.model_type,
            });
        }
        Ok(config)
    }

    /// The plugin that fills each operator slot for this checkpoint (`--plugins auto`).
    pub fn required_plugins(&self) -> Vec<(&'static str, &'static str)> {
        let attention = if self.mla.is_some() {
            "mla"
        } else if self.num_kv_heads == self.num_heads {
            "mha"
        } else if self.num_kv_heads == 1 {
            "mqa"
        } else {
            "gqa"
        };
        let norm = match self.norm {
            NormKind::Rms => "rmsnorm",
            NormKind::RmsUnitOffset => "offset-rmsnorm",
            NormKind::Layer { .. } => "layernorm",
        };
        let ffn = match (self.ffn, self.hidden_act.as_str()) {
            _ if self.moe.is_some() => "moe",
            (FfnKind::Plain { .. }, _) => "mlp",
            (FfnKind::Gated, "silu") => "swiglu",
            (FfnKind::Gated, _) => "geglu",
        };
        let residual = match self.residual {
            Residual::PreNorm => "pre-norm",
            Residual::Sandwich => "sandwich-norm",
            Residual::PostNorm => "post-norm",
            Residual::Parallel => "parallel-residual",
        };
        let position = match self.position {
            PositionKind::Rope => "rope",
            PositionKind::Alibi => "alibi",
            PositionKind::Learned => "learned-position",
        };
        let mut plugins = vec![
            ("attention", attention),
            ("position", position),
            ("norm", norm),
            ("ffn", ffn),
            ("residual", residual),
        ];
        if self.qkv_bias || self.o_bias {
            plugins.push(("qkv-bias", "qkv-bias"));
        }
        if self.qk_norm.is_some() {
            plugins.push(("qk-norm", "qk-norm"));
        }
        if self.sliding_layers.iter().any(Option::is_some) {
            plugins.push(("attention-window", "sliding-window"));
        }
        if self.nope_layers.iter().any(|n| *n) {
            plugins.push(("nope", "nope"));
        }
        if self.attn_softcap.is_some() || self.final_softcap.is_some() {
            plugins.push(("softcap", "softcap"));
        }
        if let Some(method) = self.quantization {
            plugins.push(("quantization", method));
        }
        plugins
    }

    /// The checkpoint's tensor name (under `model.layers.{i}.`) of the norm at `site`.
    pub fn norm_tensor(&self, site: NormSite) -> Option<&'static str> {
        use NormSite::*;
        match (self.model_type.as_str(), self.residual, site) {
            ("falcon", _, AttnIn) => return Some("ln_attn"),
            ("falcon", _, FfnIn) => return Some("ln_mlp"),
            ("gpt2", _, AttnIn) => return Some("ln_1"),
            ("gpt2", _, FfnIn) => return Some("ln_2"),
            (_, Residual::Parallel, AttnIn) => return Some("input_layernorm"),
            (_, Residual::Parallel, FfnIn) => return Some("post_attention_layernorm"),
            _ => {}
        }
        match (self.residual, site) {
            (Residual::PreNorm | Residual::Sandwich, AttnIn) => Some("input_layernorm"),
            (Residual::PreNorm, FfnIn) => Some("post_attention_layernorm"),
            (Residual::Sandwich | Residual::PostNorm, AttnOut) => Some("post_attention_layernorm"),
            (Residual::Sandwich, FfnIn) => Some("pre_feedforward_layernorm"),
            (Residual::Sandwich | Residual::PostNorm, FfnOut) => Some("post_feedforward_layernorm"),
            _ => None,
        }
    }

    /// The longest sequence the model accepts: `max_position_embeddings`, except under dynamic
    /// NTK scaling, whose purpose is running past the trained length with no fixed bound (as in
    /// transformers), and ALiBi, which has no trained length; there, requests are bounded by
    /// their `max_tokens` alone.
    pub fn context_length(&self) -> usize {
        match self.rope_scaling {
            _ if self.position == PositionKind::Alibi => usize::MAX,
            RopeScaling::Dynamic { .. } => usize::MAX,
            _ => self.max_position_embeddings,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Floats one token adds to one layer's cache: its keys and values, or for latent attention
    /// the compressed latent and the shared rotary key (values are not cached separately).
    pub fn kv_dim(&self) -> usize {
        match self.mla {
            Some(m) => m.kv_lora_rank + m.rope_dim,
            None => self.num_kv_heads * self.head_dim,
        }
    }
}

/// Which layers attend through a sliding window: Mistral's and StarCoder2's `sliding_window`
/// applies to every layer; Qwen's only with `use_sliding_window`; where `layer_types` is given
/// (Qwen, Gemma 2) it names the layers, else Qwen's start at `max_window_layers`.
fn sliding_window<'a>(
    f: &mut Fields<'a>,
    family: &str,
    layers: usize,
) -> Result<Vec<Option<usize>>, ConfigError> {
    // Other families' modeling code ignores these keys, so they stay unread (and refused).
    if ![
        "mistral",
        "qwen2",
        "qwen3",
        "gemma2",
        "starcoder2",
        "mixtral",
        "qwen2_moe",
        "phi3",
        "smollm3",
    ]
    .contains(&family)
    {
        return Ok(vec![None; layers]);
    }
    let window = f.usize("sliding_window")?;
    let enabled = match family {
        "qwen2" | "qwen3" | "qwen2_moe" | "smollm3" => {
            f.bool("use_sliding_window")?.unwrap_or(false)
        }
        _ => true,
    };
    let max_window_layers = f.usize("max_window_layers")?;
    let layer_types = f.get("layer_types");
    let Some(window) = window.filter(|_| enabled) else {
        return Ok(vec![None; layers]);
    };
    if window == 0 {
        return Err(invalid("`sliding_window` must be positive".into()));
    }
    match layer_types {
        Some(Value::Array(types)) => {
            if types.len() != layers {
                return Err(invalid(format!(
                    "`layer_types` has {} entries for {layers} layers",
                    types.len()
                )));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(Some(window)),
                    Some("full_attention") => Ok(None),
                    _ => Err(invalid(format!(
                        "`layer_types` entry {t} is not sliding_attention or full_attention"
                    ))),
                })
                .collect()
        }
        Some(other) => Err(invalid(format!(
            "`layer_types` must be a list, got {other}"
        ))),
        // Without `layer_types`: Gemma 2 alternates (even layers slide), Qwen slides from
        // `max_window_layers` on, the others slide everywhere.
        None => Ok((0..layers)
            .map(|i| {
                let slides = match family {
                    "gemma2" => i % 2 == 0,
                    "qwen2" | "qwen3" | "qwen2_moe" | "smollm3" => {
                        i >= max_window_layers.unwrap_or(0)
                    }
                    _ => true,
                };
                slides.then_some(window)
            })
            .collect()),
    }
}

/// GPT-2 flags that would change the forward pass, refused unless at their default.
fn gpt2_flags<'a>(f: &mut Fields<'a>) -> Result<(), ConfigError> {
    for (key, supported) in [
        ("add_cross_attention", false),
        ("scale_attn_by_inverse_layer_idx", false),
        ("scale_attn_weights", true),
    ] {
        if f.bool(key)?.is_some_and(|v| v != supported) {
            return Err(invalid(format!(
                "gpt2: `{key}: {}` is not supported",
                !supported
            )));
        }
    }
    // Upcasting only matters in half precision; vibee computes attention in f32.
    f.bool("reorder_and_upcast_attn")?;
    for key in [
        "attn_pdrop",
        "embd_pdrop",
        "resid_pdrop",
        "summary_first_dropout",
    ] {
        f.f64(key)?;
    }
    for key in ["summary_activation", "summary_type"] {
        f.string(key)?;
    }
    for key in ["summary_proj_to_labels", "summary_use_proj"] {
        f.bool(key)?;
    }
    Ok(())
}

/// Falcon's layout flags: only the new decoder architecture (Falcon 40B/180B, Falcon 2) with
/// parallel attention and its two layer norms is supported. Returns `parallel_attn`.
fn falcon_layout<'a>(f: &mut Fields<'a>) -> Result<bool, ConfigError> {
    if f.bool("new_decoder_architecture")? != Some(true) {
        return Err(invalid(
            "falcon: only `new_decoder_architecture: true` checkpoints are supported".into(),
        ));
    }
    if f.bool("alibi")? == Some(true) {
        return Err(invalid("falcon: `alibi: true` is not supported".into()));
    }
    // `multi_query` is ignored by the new architecture, which has `num_kv_heads`.
    f.bool("multi_query")?;
    if f.usize("num_ln_in_parallel_attn")?.unwrap_or(2) != 2 {
        return Err(invalid(
            "falcon: only `num_ln_in_parallel_attn: 2` is supported".into(),
        ));
    }
    match f.bool("parallel_attn")?.unwrap_or(true) {
        true => Ok(true),
        false => Err(invalid(
            "falcon: only `parallel_attn: true` is supported".into(),
        )),
    }
}

/// SmolLM3's NoPE layers: `no_rope_layers[i]` is 1 where layer `i` uses rotary embeddings and
/// 0 where it uses none; without the list, every `no_rope_layer_interval`-th layer is NoPE.
fn no_position_layers<'a>(
    f: &mut Fields<'a>,
    family: &str,
    layers: usize,
) -> Result<Vec<bool>, ConfigError> {
    if family != "smollm3" {
        return Ok(vec![false; layers]);
    }
    let interval = f.usize("no_rope_layer_interval")?;
    match f.get("no_rope_layers") {
        Some(Value::Array(flags)) if flags.len() == layers => flags
            .iter()
            .map(|v| match v.as_u64() {
                Some(0) => Ok(true),
                Some(1) => Ok(false),
                _ => Err(invalid(format!(
                    "`no_rope_layers` entries must be 0 or 1, got {v}"
                ))),
            })
            .collect(),
        Some(other) => Err(invalid(format!(
            "`no_rope_layers` must be a list of {layers} flags, got {other}"
        ))),
        None => Ok((0..layers)
            .map(|i| interval.is_some_and(|n| n > 0 && (i + 1) % n == 0))
            .collect()),
    }
}

/// DeepSeek-V2's multi-head latent attention. transformers writes `head_dim` as the rotary
/// width and `qk_head_dim` as nope + rope; both are checked against the parts.
fn latent_attention<'a>(
    f: &mut Fields<'a>,
    family: &str,
    head_dim: usize,
) -> Result<Option<MlaConfig>, ConfigError> {
    if family != "deepseek_v2" {
        return Ok(None);
    }
    let mla = MlaConfig {
        q_lora_rank: f.usize("q_lora_rank")?,
        kv_lora_rank: f.required_usize("kv_lora_rank")?,
        nope_dim: f.required_usize("qk_nope_head_dim")?,
        rope_dim: f.required_usize("qk_rope_head_dim")?,
        v_dim: f.required_usize("v_head_dim")?,
    };
    if head_dim != mla.rope_dim {
        return Err(invalid(format!(
            "deepseek_v2: head_dim ({head_dim}) must equal qk_rope_head_dim ({})",
            mla.rope_dim
        )));
    }
    if let Some(qk) = f.usize("qk_head_dim")? {
        if qk != mla.nope_dim + mla.rope_dim {
            return Err(invalid(format!(
                "deepseek_v2: qk_head_dim ({qk}) must be qk_nope_head_dim + qk_rope_head_dim"
            )));
        }
    }
    Ok(Some(mla))
}

fn mixture_of_experts<'a>(
    f: &mut Fields<'a>,
    family: &str,
    layers: usize,
) -> Result<Option<MoeConfig>, ConfigError> {
    let config = match family {
        "mixtral" => MoeConfig {
            experts: f.required_usize("num_local_experts")?,
            top_k: f.required_usize("num_experts_per_tok")?,
            expert_intermediate: f.required_usize("intermediate_size")?,
            normalize_top_k: true,
            shared_intermediate: None,
            shared_gate: false,
            routed_scale: 1.0,
            group_limit: None,
            sparse_layers: vec![true; layers],
            layout: MoeLayout::Mixtral,
        },
        "qwen2_moe" => {
            let step = f.usize("decoder_sparse_step")?.unwrap_or(1).max(1);
            let dense: Vec<usize> = match f.get("mlp_only_layers") {
                None => Vec::new(),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|v| v.as_u64().map(|n| n as usize))
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        invalid("`mlp_only_layers` must be a list of layer indices".into())
                    })?,
                Some(other) => {
                    return Err(invalid(format!(
                        "`mlp_only_layers` must be a list, got {other}"
                    )))
                }
            };
            MoeConfig {
                experts: f.required_usize("num_experts")?,
                top_k: f.required_usize("num_experts_per_tok")?,
                expert_intermediate: f.required_usize("moe_intermediate_size")?,
                normalize_top_k: f.bool("norm_topk_prob")?.unwrap_or(false),
                shared_intermediate: f
                    .usize("shared_expert_intermediate_size")?
                    .filter(|n| *n > 0),
                shared_gate: true,
                routed_scale: 1.0,
                group_limit: None,
                sparse_layers: (0..layers)
                    .map(|i| !dense.contains(&i) && (i + 1) % step == 0)
                    .collect(),
                layout: MoeLayout::Qwen,
            }
        }
        "deepseek_v2" => {
            let first_dense = f.usize("first_k_dense_replace")?.unwrap_or(0);
            let width = f.required_usize("moe_intermediate_size")?;
            // DeepSeek-V2 scales, not renormalises, its top-k weights: the key is unused.
            f.bool("norm_topk_prob")?;
            let group_limit = match f.string("topk_method")?.as_deref() {
                None | Some("greedy") => {
                    f.usize("n_group")?;
                    f.usize("topk_group")?;
                    None
                }
                Some("group_limited_greedy") => Some((
                    f.required_usize("n_group")?,
                    f.required_usize("topk_group")?,
                )),
                Some(other) => {
                    return Err(invalid(format!(
                        "deepseek_v2: topk_method `{other}` is not supported"
                    )))
                }
            };
            MoeConfig {
                experts: f.required_usize("n_routed_experts")?,
                top_k: f.required_usize("num_experts_per_tok")?,
                expert_intermediate: width,
                normalize_top_k: false,
                shared_intermediate: f
                    .usize("n_shared_experts")?
                    .filter(|n| *n > 0)
                    .map(|n| n * width),
                shared_gate: false,
                routed_scale: f.f64("routed_scaling_factor")?.unwrap_or(1.0) as f32,
                group_limit,
                sparse_layers: (0..layers).map(|i| i >= first_dense).collect(),
                layout: MoeLayout::DeepSeek,
            }
        }
        _ => return Ok(None),
    };
    if let Some((groups, top_groups)) = config.group_limit {
        if groups == 0 || config.experts % groups != 0 || top_groups == 0 || top_groups > groups {
            return Err(invalid(format!(
                "n_group ({groups}) must divide the experts ({}) and topk_group ({top_groups}) be within 1..=n_group",
                config.experts
            )));
        }
    }
    if config.top_k == 0 || config.top_k > config.experts {
        return Err(invalid(format!(
            "num_experts_per_tok ({}) must be between 1 and the number of experts ({})",
            config.top_k, config.experts
        )));
    }
    Ok(Some(config))
}

fn token_ids(value: Option<&Value>) -> Result<Vec<u32>, ConfigError> {
    let bad = || invalid("`eos_token_id` must be an integer or a list of integers".into());
    match value {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(bad))
            .collect(),
        Some(v) => v.as_u64().map(|n| vec![n as u32]).ok_or_else(bad),
    }
}

/// Settings of a GPTQ `quantization_config` that record how the checkpoint was made and do not
/// change what its tensors mean.
const GPTQ_PROVENANCE_KEYS: &[&str] = &[
    "damp_percent",
    "damp_auto_increment",
    "static_groups",
    "true_sequential",
    "model_name_or_path",
    "model_file_base_name",
    "meta",
    "dataset",
    "tokenizer",
    "use_exllama",
    "exllama_config",
    "cache_block_outputs",
    "batch_size",
    "pad_token_id",
    "use_cuda_fp16",
    "max_input_length",
    "module_name_preceding_first_block",
    "modules_in_block_to_quantize",
    "backend",
    "quantizer",
    "mse",
    "v2",
    "v2_alpha",
    "model_seqlen",
    "block_name_to_quantize",
    "disable_exllama",
];

/// Reads `quantization_config`: the plugin the stored tensors need (`awq` for AutoAWQ's GEMM
/// layout, `gptq` for GPTQ's, `hqq` for the `hqq` package's), after refusing every variant
/// whose tensors mean something else. Group sizes and bit widths are read again from the
/// tensors' shapes by the loaders.
fn quantization_config<'a>(f: &mut Fields<'a>) -> Result<Option<&'static str>, ConfigError> {
    let Some(value) = f.get("quantization_config") else {
        return Ok(None);
    };
    let map = value
        .as_object()
        .ok_or_else(|| invalid("`quantization_config` must be an object".into()))?;
    let mut q = Fields::new(map);
    let method = q
        .string("quant_method")?
        .ok_or_else(|| invalid("`quantization_config` needs `quant_method`".into()))?;
    let bits = q.usize("bits")?.unwrap_or(0);
    let group = q.get("group_size").and_then(Value::as_i64);
    let group_fits = || {
        if group == Some(-1) || group.is_some_and(|g| g > 0 && g % 32 == 0) {
            return Ok(());
        }
        Err(invalid(format!(
            "quantization_config.group_size must be a multiple of 32 or -1, got {}",
            map.get("group_size").unwrap_or(&Value::Null)
        )))
    };
    let plugin = match method.as_str() {
        "awq" => {
            group_fits()?;
            if bits != 4 {
                return Err(invalid(format!("AWQ with {bits} bits is not supported (4)")));
            }
            let version = q.string("version")?.unwrap_or_else(|| "gemm".into());
            if !version.eq_ignore_ascii_case("gemm") {
                return Err(invalid(format!(
                    "AWQ version `{version}` is not supported: vibee reads AutoAWQ's GEMM layout"
                )));
            }
            if q.bool("zero_point")? == Some(false) {
                return Err(invalid("AWQ without zero points is not supported".into()));
            }
            q.get("modules_to_not_convert");
            "awq"
        }
        "gptq" => {
            group_fits()?;
            if !matches!(bits, 4 | 8) {
                return Err(invalid(format!("GPTQ with {bits} bits is not supported (4 or 8)")));
            }
            if let Some(format) = q.string("checkpoint_format")? {
                if format != "gptq" {
                    return Err(invalid(format!(
                        "GPTQ checkpoint_format `{format}` is not supported: vibee reads `gptq` (zero points stored minus one)"
                    )));
                }
            }
            if q.bool("lm_head")? == Some(true) {
                return Err(invalid("GPTQ checkpoints with a quantized lm_head are not supported".into()));
            }
            if let Some(pack) = q.string("pack_dtype")? {
                if pack != "int32" {
                    return Err(invalid(format!("GPTQ pack_dtype `{pack}` is not supported (int32)")));
                }
            }
            // Both are visible in the tensors: zero points and `g_idx`.
            q.bool("sym")?;
            q.bool("desc_act")?;
            "gptq"
        }
        "hqq" => {
            // Each layer stores its own settings (bits, group size, axis, packing) beside its
            // tensors, and the loader checks those; layers left out have no `W_q`.
            q.get("quant_config");
            q.get("skip_modules");
            "hqq"
        }
        other => {
            return Err(invalid(format!(
                "quantization method `{other}` is not supported (supported: awq, gptq, hqq; GGUF files load directly)"
            )))
        }
    };
    let provenance = if plugin == "gptq" {
        GPTQ_PROVENANCE_KEYS
    } else {
        &[]
    };
    if let Some(key) = q.unread(provenance) {
        return Err(invalid(format!(
            "quantization_config.{key} is not understood by vibee; refusing to guess its meaning"
        )));
    }
    Ok(Some(plugin))
}

/// Reads `rope_theta` + `rope_scaling` (4.x) or `rope_parameters` (5.x).
/// Returns the base, the frequency scaling and the fraction of each head that rotates.
fn rope<'a>(
    f: &mut Fields<'a>,
    max_position_embeddings: usize,
) -> Result<(f64, RopeScaling, f64), ConfigError> {
    let top_theta = f.f64("rope_theta")?;
    let top_partial = f.f64("partial_rotary_factor")?;
    let top_original = f.usize("original_max_position_embeddings")?;
    let (params, key) = match f.get("rope_parameters") {
        Some(p) => (Some(p), "rope_parameters"),
        None => (f.get("rope_scaling"), "rope_scaling"),
    };
    let Some(params) = params else {
        return Ok((
            top_theta.unwrap_or(10000.0),
            RopeScaling::None,
            top_partial.unwrap_or(1.0),
        ));
    };
    let map = params
        .as_object()
        .ok_or_else(|| invalid(format!("`{key}` must be an object")))?;
    let mut p = Fields::new(map);
    let theta = p.f64("rope_theta")?.or(top_theta).unwrap_or(10000.0);
    let partial = p
        .f64("partial_rotary_factor")?
        .or(top_partial)
        .unwrap_or(1.0);
    let kind = match p.string("rope_type")? {
        Some(kind) => kind,
        None => p.string("type")?.unwrap_or_else(|| "default".into()),
    };
    let mut factor = || {
        p.f64("factor")?
            .ok_or_else(|| invalid(format!("`{key}` of type {kind} needs `factor`")))
    };
    let scaling = match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor()?,
            original_max_position_embeddings: p
                .usize("original_max_position_embeddings")?
                .unwrap_or(max_position_embeddings),
        },
        "llama3" => {
            let factor = factor()?;
            let mut need = |name| {
                p.f64(name)?
                    .ok_or_else(|| invalid(format!("`{key}` of type llama3 needs `{name}`")))
            };
            let low_freq_factor = need("low_freq_factor")?;
            let high_freq_factor = need("high_freq_factor")?;
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: p
                    .usize("original_max_position_embeddings")?
                    .ok_or_else(|| {
                        invalid(format!(
                            "`{key}` of type llama3 needs `original_max_position_embeddings`"
                        ))
                    })?,
            }
        }
        "yarn" => {
            let factor = factor()?;
            let original = p
                .usize("original_max_position_embeddings")?
                .or(top_original)
                .ok_or_else(|| invalid(format!("`{key}` of type yarn needs `original_max_position_embeddings`")))?;
            let mscale = p.f64("mscale")?;
            let mscale_all_dim = p.f64("mscale_all_dim")?;
            let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
            let attention_factor = match (p.f64("attention_factor")?, mscale, mscale_all_dim) {
                (Some(a), ..) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => get_mscale(factor, m) / get_mscale(factor, all),
                _ => get_mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: p.f64("beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0),
                beta_slow: p.f64("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
                truncate: p.bool("truncate")?.unwrap_or(true),
                attention_factor,
                // Latent attention scales its softmax by this squared (DeepSeek's yarn_apply_mscale).
                softmax_mscale: mscale_all_dim.filter(|m| *m != 0.0).map_or(1.0, |m| get_mscale(factor, m)),
            }
        }
        // "su" is the name Phi-3's first configs gave longrope.
        "longrope" | "su" => {
            let original = p
                .usize("original_max_position_embeddings")?
                .or(top_original)
                .ok_or_else(|| invalid(format!("`{key}` of type longrope needs `original_max_position_embeddings`")))?;
            let mut list = |name| -> Result<Vec<f64>, ConfigError> {
                p.get(name)
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                    .ok_or_else(|| invalid(format!("`{key}.{name}` must be a list of numbers")))
            };
            let (short, long) = (list("short_factor")?, list("long_factor")?);
            let factor = p.f64("factor")?.unwrap_or(max_position_embeddings as f64 / original as f64);
            let attention_factor = match p.f64("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            RopeScaling::LongRope {
                short,
                long,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        other => {
            return Err(invalid(format!(
                "{key}.rope_type `{other}` is not supported (supported: default, linear, dynamic, llama3, yarn, longrope)"
            )))
        }
    };
    if let Some(extra) = p.unread(&[]) {
        return Err(invalid(format!(
            "`{key}.{extra}` is not understood for rope type {kind}"
        )));
    }
    Ok((theta, scaling, partial))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TinyLlama-1.1B-Chat-v1.0's published config.json (transformers 4.x form).
    const TINYLLAMA_4X: &str = r#"{
      "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 1,
      "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
      "intermediate_size": 5632, "max_position_embeddings": 2048, "model_type": "llama",
      "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
      "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 10000.0,
      "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.35.0",
      "use_cache": true, "vocab_size": 32000}"#;

    #[test]
    fn transformers_4x_config_parses() {
        let c = ModelConfig::from_json(TINYLLAMA_4X).unwrap();
        assert_eq!(
            (
                c.hidden_size,
                c.num_layers,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim
            ),
            (2048, 22, 32, 4, 64)
        );
        assert_eq!(
            (c.rope_theta, c.rope_scaling.clone()),
            (10000.0, RopeScaling::None)
        );
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert_eq!(c.eos_token_ids, vec![2]);
        assert_eq!(c.required_plugins()[0], ("attention", "gqa"));
    }

    #[test]
    fn transformers_4x_llama3_rope_scaling_parses() {
        // Llama-3.1's rope_scaling block, with the legacy `rope_type` spelling.
        let json = TINYLLAMA_4X.replace(
            r#""rope_scaling": null, "rope_theta": 10000.0"#,
            r#""rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "rope_theta": 500000.0"#,
        );
        let c = ModelConfig::from_json(&json).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );
    }

    #[test]
    fn legacy_type_key_and_eos_list_parse() {
        let json = TINYLLAMA_4X
            .replace(
                r#""rope_scaling": null"#,
                r#""rope_scaling": {"type": "linear", "factor": 2.0}"#,
            )
            .replace(r#""eos_token_id": 2"#, r#""eos_token_id": [2, 7]"#);
        let c = ModelConfig::from_json(&json).unwrap();
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        assert_eq!(c.eos_token_ids, vec![2, 7]);
    }

    #[test]
    fn unsupported_rope_type_and_unknown_scaling_keys_are_named() {
        let mrope = TINYLLAMA_4X.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"type": "mrope", "factor": 2.0}"#,
        );
        assert!(ModelConfig::from_json(&mrope)
            .unwrap_err()
            .to_string()
            .contains("rope_type `mrope` is not supported"));
        let extra = TINYLLAMA_4X.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"type": "linear", "factor": 2.0, "beta": 1}"#,
        );
        assert!(ModelConfig::from_json(&extra)
            .unwrap_err()
            .to_string()
            .contains("rope_scaling.beta"));
    }

    #[test]
    fn phi3_su_scaling_reads_as_longrope() {
        let json = TINYLLAMA_4X.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [2.0],
               "original_max_position_embeddings": 1024}"#,
        );
        let c = ModelConfig::from_json(&json).unwrap();
        assert!(matches!(
            c.rope_scaling,
            RopeScaling::LongRope {
                original_max_position_embeddings: 1024,
                ..
            }
        ));
    }

    #[test]
    fn inconsistent_head_counts_are_refused() {
        let json =
            TINYLLAMA_4X.replace(r#""num_key_value_heads": 4"#, r#""num_key_value_heads": 5"#);
        assert!(ModelConfig::from_json(&json)
            .unwrap_err()
            .to_string()
            .contains("multiple of num_key_value_heads (5)"));
    }
}
