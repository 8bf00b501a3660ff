//! `config.json` of a Hugging Face checkpoint, parsed into the fields vibee's operators need.
//!
//! Both published forms are read: transformers 4.x (`rope_theta`, `rope_scaling`,
//! `torch_dtype`) and 5.x (`rope_parameters`, `dtype`). A key that would change the model's
//! output and that vibee does not understand is an error naming it, never a silent default.
//! What each family means by its keys lives in [`families`], one file per family.

pub mod families;
mod fields;
pub mod gguf;
mod quantization;
mod rope;

use std::path::Path;

use serde_json::{Map, Value};

pub use families::Family;
use fields::{invalid, Fields};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] crate::io::FileError),
    #[error("config.json is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("config.json: {0}")]
    Invalid(String),
    #[error(
        "config.json: model_type `{0}` is not supported (supported: {supported})",
        supported = families::model_types().join(", ")
    )]
    UnknownModelType(String),
    #[error("config.json: {} not understood by vibee for model_type `{model_type}`; refusing to guess {}: {}",
        if keys.len() == 1 { "a key is" } else { "keys are" },
        if keys.len() == 1 { "its meaning" } else { "their meaning" },
        keys.join(", "))]
    UnknownKeys {
        keys: Vec<String>,
        model_type: String,
    },
}

/// A config read without refusing the keys vibee does not know (for tools that only size a
/// model, such as `vibee arch`), with those keys listed.
pub struct Lenient {
    pub config: ModelConfig,
    pub unknown_keys: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    /// Dynamic NTK: the base grows once a sequence outgrows `max_position_embeddings`.
    Dynamic {
        factor: f64,
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
    /// `quantization_config.group_size` of an AWQ or GPTQ checkpoint (−1: one group per
    /// row), which must be the grouping its tensors hold.
    pub quantization_group_size: Option<i64>,
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
    pub norms: NormNames,
}

impl Layout {
    /// Llama's names, which most families share.
    pub const LLAMA: Layout = Layout {
        embed: "model.embed_tokens",
        embed_norm: None,
        final_norm: "model.norm",
        lm_head: "lm_head",
        layers: "model.layers",
        attention: "self_attn",
        qkv: QkvLayout::Separate,
        o_proj: "o_proj",
        // Llama's MLP is gated; a plain MLP's names are each plain family's to give.
        mlp_in: "c_fc",
        mlp_out: "c_proj",
        position_embed: None,
        transposed: false,
        gate_up: None,
        norms: NormNames::pre_norm("input_layernorm", "post_attention_layernorm"),
    };
}

/// The tensor name (under the layer) of the norm at each site, where the family has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormNames {
    pub attn_in: Option<&'static str>,
    pub attn_out: Option<&'static str>,
    pub ffn_in: Option<&'static str>,
    pub ffn_out: Option<&'static str>,
}

impl NormNames {
    /// Norms on the inputs of attention and feed-forward only (pre-norm and parallel layers).
    pub const fn pre_norm(attn_in: &'static str, ffn_in: &'static str) -> Self {
        NormNames {
            attn_in: Some(attn_in),
            attn_out: None,
            ffn_in: Some(ffn_in),
            ffn_out: None,
        }
    }

    /// The names of the norms the layer has, by site.
    pub fn names(&self) -> impl Iterator<Item = &'static str> {
        [self.attn_in, self.attn_out, self.ffn_in, self.ffn_out]
            .into_iter()
            .flatten()
    }

    pub fn at(&self, site: NormSite) -> Option<&'static str> {
        match site {
            NormSite::AttnIn => self.attn_in,
            NormSite::AttnOut => self.attn_out,
            NormSite::FfnIn => self.ffn_in,
            NormSite::FfnOut => self.ffn_out,
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

impl MoeLayout {
    /// The module under the layer that holds the router (`{block}.gate`) and the experts.
    pub fn block(self) -> &'static str {
        match self {
            MoeLayout::Mixtral => "block_sparse_moe",
            MoeLayout::Qwen | MoeLayout::DeepSeek => "mlp",
        }
    }

    /// An expert's gate, up and down projections.
    pub fn expert_projections(self) -> [&'static str; 3] {
        match self {
            MoeLayout::Mixtral => ["w1", "w3", "w2"],
            MoeLayout::Qwen | MoeLayout::DeepSeek => ["gate_proj", "up_proj", "down_proj"],
        }
    }

    /// The shared expert's module under the block (its projections are `{gate,up,down}_proj`).
    pub fn shared_expert(self) -> &'static str {
        match self {
            MoeLayout::DeepSeek => "shared_experts",
            _ => "shared_expert",
        }
    }
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

/// The longest `max_position_embeddings` accepted: beyond the longest context any model is
/// trained for, so a larger value is a corrupt file.
pub const MAX_POSITIONS: usize = 1 << 32;

/// The config with each of the family's aliases renamed to the common spelling.
fn renamed(
    original: &Map<String, Value>,
    family: &Family,
) -> Result<Map<String, Value>, ConfigError> {
    let mut map = Map::new();
    for (key, value) in original {
        let common = family
            .aliases
            .iter()
            .find(|(alias, _)| alias == key)
            .map_or(key.as_str(), |(_, common)| common);
        match map.get(common) {
            Some(other) if other != value && !other.is_null() && !value.is_null() => {
                return Err(invalid(format!(
                    "`{key}` ({value}) and `{common}` ({other}) disagree; they mean the same for model_type {}",
                    family.model_type
                )))
            }
            Some(other) if value.is_null() && !other.is_null() => {}
            _ => {
                map.insert(common.to_string(), value.clone());
            }
        }
    }
    Ok(map)
}

impl ModelConfig {
    pub fn from_dir(dir: &Path) -> Result<Self, ConfigError> {
        let text = crate::io::read_regular_text(&dir.join("config.json"), crate::io::SMALL_FILE)?;
        Self::from_json(&text)
    }

    /// Reads a config, refusing any key that vibee does not understand.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let Lenient {
            config,
            unknown_keys,
        } = Self::lenient(text)?;
        if !unknown_keys.is_empty() {
            return Err(ConfigError::UnknownKeys {
                keys: unknown_keys,
                model_type: config.model_type,
            });
        }
        Ok(config)
    }

    /// Reads a config; keys no reader asked for are returned rather than refused.
    pub fn lenient(text: &str) -> Result<Lenient, ConfigError> {
        let value: Value = serde_json::from_str(text)?;
        let original = value
            .as_object()
            .ok_or_else(|| invalid("the top level must be an object".into()))?;
        let model_type = match original.get("model_type") {
            Some(Value::String(t)) => t.as_str(),
            Some(other) => {
                return Err(invalid(format!(
                    "`model_type` must be a string, got {other}"
                )))
            }
            None => return Err(invalid("missing required key `model_type`".into())),
        };
        let family = families::find(model_type)
            .ok_or_else(|| ConfigError::UnknownModelType(model_type.into()))?;
        let map = renamed(original, family)?;
        let mut f = Fields::new(&map);
        f.get("model_type");
        let config = (family.read)(&mut f)?;
        config.validate()?;
        let unknown_keys = f.unread(|k| families::INERT.contains(&k) || family.inert.contains(&k));
        Ok(Lenient {
            config,
            unknown_keys,
        })
    }

    /// Checks that hold in every family, once the family's reader is done.
    fn validate(&self) -> Result<(), ConfigError> {
        let (heads, kv_heads) = (self.num_heads, self.num_kv_heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(invalid(format!(
                "num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )));
        }
        let rotary = self.rotary_dim;
        if self.position == PositionKind::Rope
            && (rotary == 0 || !rotary.is_multiple_of(2) || rotary > self.head_dim)
        {
            return Err(invalid(format!(
                "the rotary embedding turns {rotary} of {} dimensions per head (partial_rotary_factor): must be even, positive and at most head_dim",
                self.head_dim
            )));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(invalid(format!(
                "the norm epsilon must be a positive number, got {}",
                self.rms_norm_eps
            )));
        }
        if self.max_position_embeddings == 0 || self.max_position_embeddings > MAX_POSITIONS {
            return Err(invalid(format!(
                "`max_position_embeddings` is {}: must be between 1 and {MAX_POSITIONS}",
                self.max_position_embeddings
            )));
        }
        let vocab = self.vocab_size;
        let outside = self
            .eos_token_ids
            .iter()
            .chain(&self.bos_token_id)
            .find(|id| **id as usize >= vocab);
        if let Some(id) = outside {
            return Err(invalid(format!(
                "token id {id} (bos_token_id/eos_token_id) is outside the vocabulary of {vocab}"
            )));
        }
        Ok(())
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

    /// What vibee knows about this config's family.
    pub fn family(&self) -> &'static Family {
        families::find(&self.model_type).expect("a config is only built for a known family")
    }

    /// The checkpoint's tensor name (under `model.layers.{i}.`) of the norm at `site`.
    pub fn norm_tensor(&self, site: NormSite) -> Option<&'static str> {
        self.layout.norms.at(site)
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

    fn refusal(json: &str) -> String {
        ModelConfig::from_json(json).unwrap_err().to_string()
    }

    /// `text` with the keys of the JSON object `extra` set.
    fn extended(text: &str, extra: &str) -> String {
        let mut v: Value = serde_json::from_str(text).unwrap();
        v.as_object_mut()
            .unwrap()
            .extend(serde_json::from_str::<Map<String, Value>>(extra).unwrap());
        v.to_string()
    }

    fn with(key: &str, value: &str) -> String {
        let mut v: Value = serde_json::from_str(TINYLLAMA_4X).unwrap();
        v[key] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    #[test]
    fn a_full_pretrained_config_dump_loads() {
        // What transformers 4.x `PretrainedConfig.to_dict()` adds to every model's keys.
        let dump = extended(
            TINYLLAMA_4X,
            r#"{"return_dict": true, "output_hidden_states": false, "output_attentions": false,
            "torchscript": false, "use_bfloat16": false, "tf_legacy_loss": false,
            "pruned_heads": {}, "chunk_size_feed_forward": 0, "is_encoder_decoder": false,
            "is_decoder": false, "cross_attention_hidden_size": null, "add_cross_attention": false,
            "tie_encoder_decoder": false, "max_length": 20, "min_length": 0, "do_sample": false,
            "early_stopping": false, "num_beams": 1, "num_beam_groups": 1,
            "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
            "typical_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": null,
            "num_return_sequences": 1, "output_scores": false, "return_dict_in_generate": false,
            "forced_bos_token_id": null, "forced_eos_token_id": null, "remove_invalid_values": false,
            "exponential_decay_length_penalty": null, "suppress_tokens": null,
            "begin_suppress_tokens": null, "finetuning_task": null,
            "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
            "tokenizer_class": null, "prefix": null, "sep_token_id": null,
            "decoder_start_token_id": null, "task_specific_params": null, "problem_type": null,
            "auto_map": {"AutoConfig": "configuration.Config"}, "cache_implementation": null,
            "unk_token_id": 0}"#,
        );
        ModelConfig::from_json(&dump).unwrap();
        // Encoder-decoder settings are accepted only at a decoder's values.
        let e = refusal(&with("is_encoder_decoder", "true"));
        assert!(
            e.contains("`is_encoder_decoder: true` is not supported"),
            "{e}"
        );
        let e = refusal(&with("pruned_heads", r#"{"0": [1]}"#));
        assert!(e.contains("pruned_heads"), "{e}");
    }

    #[test]
    fn values_that_make_no_sense_are_refused_by_name() {
        for (key, value, expected) in [
            (
                "rms_norm_eps",
                "0",
                "norm epsilon must be a positive number",
            ),
            (
                "rms_norm_eps",
                "-1e-5",
                "norm epsilon must be a positive number",
            ),
            (
                "eos_token_id",
                "32000",
                "token id 32000 (bos_token_id/eos_token_id) is outside the vocabulary of 32000",
            ),
            (
                "bos_token_id",
                "4294967296",
                "`bos_token_id` must be a token id",
            ),
            (
                "max_position_embeddings",
                "100000000000",
                "`max_position_embeddings` is 100000000000",
            ),
            (
                "max_position_embeddings",
                "0",
                "`max_position_embeddings` is 0",
            ),
            (
                "num_hidden_layers",
                "9223372036854775807",
                "`num_hidden_layers` is 9223372036854775807",
            ),
            (
                "num_hidden_layers",
                "1000000000",
                "more than any model vibee can hold (4096)",
            ),
            (
                "hidden_size",
                "18446744073709551615",
                "`hidden_size` is 18446744073709551615",
            ),
            (
                "rope_theta",
                "-10000",
                "`rope_theta` must be a positive number",
            ),
            (
                "rope_scaling",
                r#"{"type": "linear", "factor": 0}"#,
                "`factor` must be a positive number",
            ),
            (
                "rope_scaling",
                r#"{"type": "yarn", "factor": 4, "original_max_position_embeddings": 0}"#,
                "original_max_position_embeddings must be positive",
            ),
            (
                "rope_scaling",
                r#"{"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024, "beta_fast": -32}"#,
                "`rope_scaling.beta_fast` must be positive, got -32",
            ),
            (
                "rope_scaling",
                r#"{"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024, "attention_factor": -1}"#,
                "`rope_scaling.attention_factor` must be positive",
            ),
            (
                "rope_scaling",
                r#"{"type": "longrope", "short_factor": [1, 1, 1, 1], "long_factor": [0, 0, 0, 0], "original_max_position_embeddings": 8}"#,
                "`rope_scaling.long_factor` holds 0: every factor must be positive",
            ),
            (
                "rope_scaling",
                r#"{"type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4, "original_max_position_embeddings": 64}"#,
                "`rope_scaling.high_freq_factor` (4) must exceed low_freq_factor (4)",
            ),
        ] {
            let e = refusal(&with(key, value));
            assert!(e.contains(expected), "{key}={value}: {e}");
        }
    }

    #[test]
    fn a_leftover_rope_type_must_agree() {
        let same = with(
            "rope_parameters",
            r#"{"rope_type": "linear", "type": "linear", "factor": 2.0, "rope_theta": 10000.0}"#,
        );
        assert_eq!(
            ModelConfig::from_json(&same).unwrap().rope_scaling,
            RopeScaling::Linear { factor: 2.0 }
        );
        let differ = with(
            "rope_parameters",
            r#"{"rope_type": "linear", "type": "dynamic", "factor": 2.0}"#,
        );
        assert!(refusal(&differ).contains("rope_type `linear` but type `dynamic`"));
    }

    #[test]
    fn family_keys_at_values_vibee_does_not_implement_are_refused() {
        let family = |model_type: &str, extra: &str| {
            extended(&with("model_type", &format!("\"{model_type}\"")), extra)
        };
        for (model_type, extra, expected) in [
            (
                "qwen2",
                r#"{"use_mrope": true}"#,
                "qwen2: `use_mrope: true` is not supported",
            ),
            (
                "starcoder2",
                r#"{"mlp_type": "gated"}"#,
                "starcoder2: `mlp_type: \"gated\"`",
            ),
            (
                "starcoder2",
                r#"{"norm_type": "rms_norm"}"#,
                "starcoder2: `norm_type",
            ),
            (
                "gpt2",
                r#"{"n_ctx": 1024, "n_positions": 2048}"#,
                "n_ctx (1024) and n_positions (2048) disagree",
            ),
            ("bloom", r#"{"n_inner": 100}"#, "bloom: n_inner (100)"),
            ("falcon", r#"{"alibi": true}"#, "falcon: `alibi: true`"),
            (
                "falcon",
                r#"{"new_decoder_architecture": true, "parallel_attn": false}"#,
                "needs `parallel_attn: true`",
            ),
            (
                "gemma2",
                r#"{"sliding_window": 4096, "sliding_window_size": 2048}"#,
                "sliding_window_size (2048) and sliding_window (4096) disagree",
            ),
        ] {
            let e = refusal(&family(model_type, extra));
            assert!(e.contains(expected), "{model_type} {extra}: {e}");
        }
        let deepseek = |extra: &str| {
            let text = include_str!("../../../../tests/fixtures/configs/DeepSeek-V2-Lite.json");
            refusal(&extended(text, extra))
        };
        assert!(deepseek(r#"{"scoring_func": "sigmoid"}"#).contains(
            "deepseek_v2: `scoring_func: \"sigmoid\"` is not supported (only \"softmax\")"
        ));
        assert!(deepseek(r#"{"moe_layer_freq": 2}"#).contains("`moe_layer_freq: 2`"));
        assert!(deepseek(r#"{"head_dim": 128}"#)
            .contains("head_dim (128) must equal qk_rope_head_dim (64)"));
    }

    #[test]
    fn gemma_legacy_keys_are_read() {
        let gemma = |extra: &str| {
            let text = include_str!("../../../../tests/fixtures/configs/gemma-7b.json");
            ModelConfig::from_json(&extended(text, extra)).unwrap()
        };
        assert_eq!(gemma("{}").hidden_act, "gelu_pytorch_tanh");
        assert_eq!(
            gemma(r#"{"hidden_activation": null}"#).hidden_act,
            "gelu_pytorch_tanh"
        );
        let conflict = include_str!("../../../../tests/fixtures/configs/gemma-7b.json").replace(
            "\"hidden_act\"",
            "\"hidden_activation\": \"gelu\", \"hidden_act\"",
        );
        assert!(refusal(&conflict).contains("and hidden_activation `gelu` disagree"));
        let mut v: Value = serde_json::from_str(include_str!(
            "../../../../tests/fixtures/configs/gemma-2-9b-it.json"
        ))
        .unwrap();
        v.as_object_mut().unwrap().remove("sliding_window");
        let c = ModelConfig::from_json(&v.to_string()).unwrap();
        assert_eq!(&c.sliding_layers[..2], &[Some(4096), None]);
    }
}
