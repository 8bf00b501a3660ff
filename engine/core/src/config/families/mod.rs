//! Everything vibee knows about each model family, one file per family: its config keys and
//! their aliases, the keys that change nothing in a forward pass, its tensor names and norm
//! sites, and the name llama.cpp's converter gives it in GGUF files. Adding a family is a file
//! here, a line in [`FAMILIES`] and a fixture.

use serde_json::Value;

use crate::io::gguf::Gguf;

use super::fields::{invalid, Fields};
use super::quantization::quantization_config;
use super::rope::rope;
use super::{
    ConfigError, FfnKind, Layout, ModelConfig, MoeConfig, MoeLayout, NormKind, PositionKind,
    Residual,
};

mod bloom;
mod deepseek_v2;
mod falcon;
mod gemma;
mod gemma2;
mod gpt2;
mod gpt_neox;
mod llama;
mod mistral;
mod mixtral;
mod olmo2;
mod phi3;
mod qwen2;
mod qwen2_moe;
mod qwen3;
mod qwen3_moe;
mod smollm3;
mod starcoder2;

pub struct Family {
    /// The config's `model_type`.
    pub model_type: &'static str,
    /// Keys this family spells its own way, each with the common spelling it is read under.
    pub aliases: &'static [(&'static str, &'static str)],
    /// Keys of this family's configs that change nothing in a forward pass.
    pub inert: &'static [&'static str],
    /// Reads the family's config; the common keys go through [`decoder`].
    pub read: fn(&mut Fields) -> Result<ModelConfig, ConfigError>,
    /// How llama.cpp's converter writes the family to GGUF, where vibee reads such files.
    pub gguf: Option<GgufForm>,
}

/// What llama.cpp's converter (`convert_hf_to_gguf.py`) makes of a family.
pub struct GgufForm {
    /// `general.architecture`.
    pub architecture: &'static str,
    /// A metadata key (after `{architecture}.`) whose positive value tells this family from
    /// another the converter writes under the same architecture (Mixtral is `llama` with experts).
    pub when: Option<&'static str>,
    /// Metadata keys (after `{architecture}.`) read as the config.json key named beside them,
    /// beyond the ones every architecture has.
    pub metadata: &'static [(&'static str, &'static str)],
    /// Config flags the file says by a tensor's presence: `(part, key)` sets `key` to whether
    /// the first layer has `blk.0.{part}.weight`.
    pub flags: &'static [(&'static str, &'static str)],
    /// Tensor names of a layer (after `blk.N.`) that mean a norm other than the common one:
    /// `(part, norm)`, used where the config's layout has that norm.
    pub norms: &'static [(&'static str, &'static str)],
    /// Accounts in the config for what the converter did to the tensors' values (they are read
    /// in place, never rewritten) and for what it leaves out of the file that llama.cpp assumes.
    pub stored: fn(&mut ModelConfig),
    /// Rewrites the config.json built from the file's metadata where the converter wrote the
    /// family in another model's terms (DeepSeek-V2's latent attention as one shared key head).
    pub translate: fn(&Gguf, &mut Value) -> anyhow::Result<()>,
}

impl GgufForm {
    /// The common metadata, tensors' values as they are.
    pub const PLAIN: GgufForm = GgufForm {
        architecture: "",
        when: None,
        metadata: &[],
        flags: &[],
        norms: &[],
        stored: |_| {},
        translate: |_, _| Ok(()),
    };

    /// A family the converter writes with the common metadata and its tensors' values as they
    /// are.
    pub const fn plain(architecture: &'static str) -> Option<GgufForm> {
        Some(GgufForm {
            architecture,
            ..GgufForm::PLAIN
        })
    }
}

pub static FAMILIES: &[&Family] = &[
    &llama::FAMILY,
    &mistral::FAMILY,
    &qwen2::FAMILY,
    &qwen3::FAMILY,
    &gemma::FAMILY,
    &gemma2::FAMILY,
    &olmo2::FAMILY,
    &starcoder2::FAMILY,
    &mixtral::FAMILY,
    &qwen2_moe::FAMILY,
    &qwen3_moe::FAMILY,
    &gpt_neox::FAMILY,
    &falcon::FAMILY,
    &falcon::REFINED_WEB,
    &falcon::REFINED_WEB_MODEL,
    &bloom::FAMILY,
    &gpt2::FAMILY,
    &phi3::FAMILY,
    &deepseek_v2::FAMILY,
    &smollm3::FAMILY,
];

pub fn find(model_type: &str) -> Option<&'static Family> {
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.model_type == model_type)
}

/// The family of GGUF files of `architecture` whose metadata has the keys `has` says it has.
pub fn from_gguf(architecture: &str, has: impl Fn(&str) -> bool) -> Option<&'static Family> {
    let forms = || {
        FAMILIES.iter().copied().filter(|f| {
            f.gguf
                .as_ref()
                .is_some_and(|g| g.architecture == architecture)
        })
    };
    let marked = |f: &Family| f.gguf.as_ref().and_then(|g| g.when);
    forms()
        .find(|f| marked(f).is_some_and(&has))
        .or_else(|| forms().find(|f| marked(f).is_none()))
}

pub fn model_types() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.model_type).collect()
}

/// Keys that change no family's forward pass: bookkeeping, tokenizer ids, training-only
/// settings, and `PretrainedConfig`'s generation and output settings (a full `to_dict()` dump
/// carries them all).
pub const INERT: &[&str] = &[
    "_name_or_path",
    "_commit_hash",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "architectures",
    "auto_map",
    "transformers_version",
    "model_name",
    "tokenizer_class",
    "task_specific_params",
    "finetuning_task",
    "id2label",
    "label2id",
    "problem_type",
    "num_labels",
    "_num_labels",
    "prefix",
    "use_cache",
    // transformers 2's name for use_cache.
    "output_past",
    "cache_implementation",
    "is_decoder",
    // Token ids the tokenizer and the sampler own.
    "pad_token_id",
    "unk_token_id",
    "sep_token_id",
    "cls_token_id",
    "mask_token_id",
    "decoder_start_token_id",
    // Output settings of transformers' Python API.
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "output_scores",
    "return_dict_in_generate",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    // Splits the feed-forward into chunks of rows: the same numbers, less memory.
    "chunk_size_feed_forward",
    // Generation defaults (transformers 4 reads them when there is no generation_config.json):
    // how to sample, not what the model computes.
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    // Training-only settings.
    "initializer_range",
    "initializer_factor",
    "pretraining_tp",
    "attention_dropout",
    "attn_pdrop",
    "embd_pdrop",
    "resid_pdrop",
    "embedding_dropout",
    "residual_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "router_jitter_noise",
    "output_router_logits",
    "gradient_checkpointing",
];

/// Refuses `PretrainedConfig`'s settings of encoder-decoder and pruned models at any value but
/// the one every decoder-only checkpoint has.
fn decoder_only(f: &mut Fields, family: &str) -> Result<(), ConfigError> {
    for key in [
        "is_encoder_decoder",
        "add_cross_attention",
        "tie_encoder_decoder",
    ] {
        f.only(key, &Value::Bool(false), family)?;
    }
    f.only("pruned_heads", &Value::Object(Default::default()), family)?;
    f.only("cross_attention_hidden_size", &Value::Null, family)
}

/// The deepest stack vibee accepts: the largest published models have a few hundred layers, and
/// per-layer settings are sized by this before any weight is read.
pub const MAX_LAYERS: usize = 4096;

/// The widest dimension (hidden size, heads, vocabulary, …) vibee accepts: far past any model
/// that fits in memory, small enough that no product of two overflows.
pub const MAX_DIM: usize = 1 << 24;

/// What the common keys default to in a family, where transformers' defaults differ.
#[derive(Clone, Copy)]
pub struct Defaults {
    pub tie_word_embeddings: bool,
    /// `head_dim` when the config leaves it out (else hidden_size / num_attention_heads).
    pub head_dim: Option<usize>,
    /// Whether the family's transformers class reads `head_dim`; where it does not, the key
    /// is ignored and heads are hidden_size / num_attention_heads wide.
    pub reads_head_dim: bool,
    /// The key the MLP width is read from (`intermediate_size` elsewhere ignored, as the
    /// family's transformers class ignores it), or none where the width is fixed.
    pub intermediate_key: Option<&'static str>,
    /// The MLP width as a multiple of hidden_size when the key is left out (else required).
    pub intermediate_per_hidden: Option<usize>,
    pub hidden_act: &'static str,
    pub norm_eps: f64,
    pub rope_theta: f64,
    /// The fraction of each head the rotary embedding turns.
    pub partial_rotary: f64,
    /// The default of a top-level `original_max_position_embeddings`, for the families whose
    /// transformers config class defines that key (it then overrides the rope scaling's own).
    pub original_max_position_embeddings: Option<usize>,
}

impl Defaults {
    pub const LLAMA: Defaults = Defaults {
        tie_word_embeddings: false,
        head_dim: None,
        reads_head_dim: true,
        intermediate_key: Some("intermediate_size"),
        intermediate_per_hidden: None,
        hidden_act: "silu",
        norm_eps: 1e-6,
        rope_theta: 10000.0,
        partial_rotary: 1.0,
        original_max_position_embeddings: None,
    };

    /// Llama's, with the norm epsilon of transformers' LayerNorm families (and some others).
    pub const EPS_1E5: Defaults = Defaults {
        norm_eps: 1e-5,
        ..Defaults::LLAMA
    };
}

pub fn dimension(f: &mut Fields, key: &'static str) -> Result<usize, ConfigError> {
    bounded(key, f.required_usize(key)?, MAX_DIM)
}

pub fn bounded(key: &str, value: usize, limit: usize) -> Result<usize, ConfigError> {
    if value > limit {
        return Err(invalid(format!(
            "`{key}` is {value}: more than any model vibee can hold ({limit})"
        )));
    }
    Ok(value)
}

/// The keys every decoder shares, read into a Llama-shaped config (pre-norm RMSNorm, rotary
/// positions, separate unbiased q/k/v, gated feed-forward) that the family then adjusts.
pub fn decoder(
    f: &mut Fields,
    model_type: &str,
    defaults: Defaults,
) -> Result<ModelConfig, ConfigError> {
    decoder_only(f, model_type)?;
    let hidden_size = dimension(f, "hidden_size")?;
    let num_heads = dimension(f, "num_attention_heads")?;
    let num_kv_heads = match f.usize("num_key_value_heads")? {
        Some(n) => bounded("num_key_value_heads", n, MAX_DIM)?,
        None => num_heads,
    };
    if !defaults.reads_head_dim {
        f.ignore(&["head_dim"]);
    }
    if defaults.intermediate_key != Some("intermediate_size") {
        f.ignore(&["intermediate_size"]);
    }
    let given_head_dim = match defaults.reads_head_dim {
        true => f.usize("head_dim")?,
        false => None,
    };
    let head_dim = match given_head_dim.or(defaults.head_dim) {
        Some(d) => bounded("head_dim", d, MAX_DIM)?,
        None if hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
        None => {
            return Err(invalid(format!(
                "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads}) and no head_dim is given"
            )))
        }
    };
    let num_layers = bounded(
        "num_hidden_layers",
        f.required_usize("num_hidden_layers")?,
        MAX_LAYERS,
    )?;
    let max_position_embeddings = f.usize("max_position_embeddings")?.unwrap_or(2048);
    let (rope_theta, rope_scaling, rotary_factor) = rope(f, max_position_embeddings, &defaults)?;
    // A family that gives these keys a meaning of its own has read them already.
    for key in ["attention_bias", "mlp_bias"] {
        if !f.is_read(key) && f.bool(key)? == Some(true) {
            return Err(invalid(format!(
                "`{key}: true` (biases on every attention/MLP projection of model_type {model_type}) is not implemented by any vibee plugin yet"
            )));
        }
    }
    if f.bool("use_bidirectional_attention")? == Some(true) {
        return Err(invalid(
            "`use_bidirectional_attention: true` is not supported: vibee runs causal decoders"
                .into(),
        ));
    }
    let given_intermediate = match defaults.intermediate_key {
        Some(key) => f
            .usize(key)?
            .map(|n| bounded(key, n, MAX_DIM))
            .transpose()?,
        None => None,
    };
    let intermediate_size = match (given_intermediate, defaults.intermediate_per_hidden) {
        (Some(n), _) => n,
        (None, Some(k)) => k * hidden_size,
        (None, None) => dimension(f, defaults.intermediate_key.unwrap_or("intermediate_size"))?,
    };
    let (quantization, quantization_group_size) = quantization_config(f)?;
    let dtype = match f.string("dtype")? {
        Some(d) => Some(d),
        None => f.string("torch_dtype")?,
    };
    Ok(ModelConfig {
        model_type: model_type.to_string(),
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size: dimension(f, "vocab_size")?,
        max_position_embeddings,
        rms_norm_eps: f.f64("rms_norm_eps")?.unwrap_or(defaults.norm_eps),
        rope_theta,
        rope_scaling,
        hidden_act: f
            .string("hidden_act")?
            .unwrap_or_else(|| defaults.hidden_act.into()),
        position: PositionKind::Rope,
        tie_word_embeddings: f
            .bool("tie_word_embeddings")?
            .unwrap_or(defaults.tie_word_embeddings),
        bos_token_id: token_id(f.get("bos_token_id"), "bos_token_id")?,
        eos_token_ids: token_ids(f.get("eos_token_id"))?,
        dtype,
        qkv_bias: false,
        o_bias: false,
        // transformers truncates; the nudge keeps a factor that is an exact ratio (a GGUF
        // file's rotary width over head_dim) from truncating one below it.
        rotary_dim: (head_dim as f64 * rotary_factor + 1e-9) as usize,
        layout: Layout::LLAMA,
        qk_norm: None,
        sliding_layers: vec![None; num_layers],
        norm: NormKind::Rms,
        residual: Residual::PreNorm,
        ffn: FfnKind::Gated,
        moe: None,
        mla: None,
        rope_interleaved: false,
        quantization,
        quantization_group_size,
        nope_layers: vec![false; num_layers],
        attn_softcap: None,
        final_softcap: None,
        query_pre_attn_scalar: None,
        embedding_scale: None,
    })
}

fn token_id(value: Option<&Value>, key: &str) -> Result<Option<u32>, ConfigError> {
    value
        .map(|v| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| invalid(format!("`{key}` must be a token id, got {v}")))
        })
        .transpose()
}

fn token_ids(value: Option<&Value>) -> Result<Vec<u32>, ConfigError> {
    match value {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| token_id(Some(v), "eos_token_id").map(Option::unwrap_or_default))
            .collect(),
        Some(v) => Ok(token_id(Some(v), "eos_token_id")?.into_iter().collect()),
    }
}

/// How a family decides which layers attend through a sliding window (as its transformers
/// config class builds `layer_types`).
#[derive(Clone, PartialEq, Eq)]
pub enum Sliding {
    /// Every layer (Mistral, Mixtral, StarCoder2, Phi-3).
    Everywhere,
    /// With `use_sliding_window`: `layer_types`, else the layers from `max_window_layers` (28
    /// by default) on (Qwen2, Qwen3).
    Qwen,
    /// With `use_sliding_window`: `layer_types`, else the even layers below
    /// `max_window_layers` (Qwen2-MoE).
    QwenMoe,
    /// With `use_sliding_window`: every layer (Qwen3-MoE).
    QwenEverywhere,
    /// With `use_sliding_window`: `layer_types`, else these layers (SmolLM3's NoPE layers).
    Layers(Vec<bool>),
    /// `layer_types`, else every other layer from the first (Gemma 2).
    Alternating,
}

/// The GPT-era layer (GPT-2, GPT-NeoX, BLOOM, Falcon): LayerNorm with biases and a plain MLP,
/// with biases on the projections where `bias` says.
pub fn gpt_layer(config: &mut ModelConfig, bias: bool) {
    (config.qkv_bias, config.o_bias) = (bias, bias);
    config.norm = NormKind::Layer { bias: true };
    config.ffn = FfnKind::Plain { bias };
}

/// Reads `sliding_window` (`default` when the key is absent, none when it is null) and the
/// layers it applies to.
pub fn sliding_window(
    f: &mut Fields,
    how: Sliding,
    default: Option<usize>,
    config: &mut ModelConfig,
) -> Result<(), ConfigError> {
    let layers = config.num_layers;
    let window = match f.usize("sliding_window")? {
        None if !f.present("sliding_window") => default,
        given => given,
    };
    let gated = !matches!(how, Sliding::Everywhere | Sliding::Alternating);
    let enabled = !gated || f.bool("use_sliding_window")?.unwrap_or(false);
    let max_window_layers = match how {
        Sliding::Qwen | Sliding::QwenMoe => f.usize("max_window_layers")?.unwrap_or(28),
        // Published Qwen3-MoE and SmolLM3 configs carry it; their models never read it.
        _ => {
            f.ignore(&["max_window_layers"]);
            0
        }
    };
    let layer_types = match how {
        Sliding::Everywhere | Sliding::QwenEverywhere => None,
        _ => f.get("layer_types"),
    };
    let Some(window) = window.filter(|_| enabled) else {
        return Ok(());
    };
    if window == 0 {
        return Err(invalid("`sliding_window` must be positive".into()));
    }
    config.sliding_layers = match layer_types {
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
                .collect::<Result<_, _>>()?
        }
        Some(other) => {
            return Err(invalid(format!(
                "`layer_types` must be a list, got {other}"
            )))
        }
        None => (0..layers)
            .map(|i| {
                let slides = match &how {
                    Sliding::Everywhere | Sliding::QwenEverywhere => true,
                    Sliding::Qwen => i >= max_window_layers,
                    Sliding::QwenMoe => i % 2 == 0 && i < max_window_layers,
                    Sliding::Layers(chosen) => chosen[i],
                    Sliding::Alternating => i % 2 == 0,
                };
                slides.then_some(window)
            })
            .collect(),
    };
    Ok(())
}

/// Qwen's mixture of experts (Qwen2-MoE, Qwen3-MoE): every `decoder_sparse_step`-th layer not
/// in `mlp_only_layers` routes each token to `num_experts_per_tok` of `num_experts` SwiGLU
/// experts, plus a gated shared expert where `shared_expert_intermediate_size` says so.
pub fn qwen_experts(
    f: &mut Fields,
    layers: usize,
    normalize_default: bool,
) -> Result<MoeConfig, ConfigError> {
    let step = f.usize("decoder_sparse_step")?.unwrap_or(1).max(1);
    let dense = f.indices("mlp_only_layers")?;
    let shared_intermediate = f
        .usize("shared_expert_intermediate_size")?
        .filter(|n| *n > 0);
    experts(MoeConfig {
        experts: bounded("num_experts", f.required_usize("num_experts")?, MAX_DIM)?,
        top_k: f.required_usize("num_experts_per_tok")?,
        expert_intermediate: dimension(f, "moe_intermediate_size")?,
        normalize_top_k: f.bool("norm_topk_prob")?.unwrap_or(normalize_default),
        shared_intermediate,
        shared_gate: shared_intermediate.is_some(),
        routed_scale: 1.0,
        group_limit: None,
        sparse_layers: (0..layers)
            .map(|i| !dense.contains(&i) && (i + 1) % step == 0)
            .collect(),
        layout: MoeLayout::Qwen,
    })
}

/// The most experts vibee accepts in a layer: published models have up to a few hundred.
pub const MAX_EXPERTS: usize = 4096;

/// Checks the routing of a mixture of experts.
pub fn experts(config: MoeConfig) -> Result<MoeConfig, ConfigError> {
    bounded("the expert count", config.experts, MAX_EXPERTS)?;
    if let Some((groups, top_groups)) = config.group_limit {
        if groups == 0
            || !config.experts.is_multiple_of(groups)
            || top_groups == 0
            || top_groups > groups
        {
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
    Ok(config)
}

/// Gemma's activation: `hidden_act`, whose legacy value `gelu` in the first Gemma releases
/// means the tanh approximation (what Google's reference implementation computes, and what
/// transformers 5 substitutes). Later files add `hidden_activation`, which transformers 4.40–4.45
/// read instead: where the two disagree, which one the file means is a guess, so it is refused.
pub fn gemma_activation(f: &mut Fields, hidden_act: &str) -> Result<String, ConfigError> {
    let act = match hidden_act {
        "gelu" => "gelu_pytorch_tanh",
        other => other,
    };
    match f.string("hidden_activation")? {
        Some(other) if other != act => Err(invalid(format!(
            "gemma: hidden_act `{hidden_act}` (read as {act}, as transformers does) and hidden_activation `{other}` disagree"
        ))),
        _ => Ok(act.into()),
    }
}
