//! Falcon. Three layer arrangements, all LayerNorm with a plain GELU MLP and one fused
//! `query_key_value` holding, per key/value head, its query heads, its key and its value:
//! - the original (falcon-7b): attention and MLP in parallel off one shared `input_layernorm`,
//!   multi-query attention;
//! - the new decoder (falcon-40b/180b, Falcon 2): parallel, grouped key/value heads, two norms
//!   (`ln_attn`, `ln_mlp`) or, with `num_ln_in_parallel_attn: 1` (Falcon 2), one shared;
//! - `parallel_attn: false`: a sequential pre-norm layer.
//!
//! The first releases, before Falcon moved into transformers, name the two architectures by
//! `model_type`: `RefinedWebModel` (falcon-7b) is the original decoder, `RefinedWeb`
//! (falcon-40b) the new one, with `n_head`, `n_head_kv` and `n_layer` for the counts.

use serde_json::Value;

use super::{bloom, decoder, gpt_layer, Defaults, Family, Fields, GgufForm};
use crate::config::fields::invalid;
use crate::config::{ConfigError, Layout, ModelConfig, NormNames, QkvLayout, Residual};

pub static FAMILY: Family = Family {
    model_type: "falcon",
    aliases: ALIASES,
    inert: &[],
    read,
    // The converter regroups each key/value group's rows into all queries, then all keys, then
    // all values; a second norm (`attn_norm_2`, the attention's) marks the new decoder, whose
    // MLP norm is then `attn_norm`.
    gguf: Some(GgufForm {
        architecture: "falcon",
        metadata: &[("feed_forward_length", "ffn_hidden_size")],
        flags: &[("attn_norm_2", "new_decoder_architecture")],
        norms: &[("attn_norm", "ln_mlp"), ("attn_norm_2", "ln_attn")],
        stored: |config| config.layout.qkv = QkvLayout::Concat("query_key_value"),
        ..GgufForm::PLAIN
    }),
};

pub static REFINED_WEB: Family = Family {
    model_type: "RefinedWeb",
    aliases: ALIASES,
    inert: &[],
    read: |f| falcon(f, "RefinedWeb", Some(true)),
    gguf: None,
};

pub static REFINED_WEB_MODEL: Family = Family {
    model_type: "RefinedWebModel",
    aliases: ALIASES,
    inert: &[],
    read: |f| falcon(f, "RefinedWebModel", Some(false)),
    gguf: None,
};

const ALIASES: &[(&str, &str)] = &[
    ("n_embed", "hidden_size"),
    ("n_head", "num_attention_heads"),
    ("n_layer", "num_hidden_layers"),
    ("n_head_kv", "num_key_value_heads"),
    ("num_kv_heads", "num_key_value_heads"),
    ("layer_norm_epsilon", "rms_norm_eps"),
    ("activation", "hidden_act"),
];

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    falcon(f, "falcon", None)
}

/// `architecture`: whether the decoder is the new one, where the `model_type` says so.
fn falcon(
    f: &mut Fields,
    model_type: &str,
    architecture: Option<bool>,
) -> Result<ModelConfig, ConfigError> {
    if f.bool("alibi")? == Some(true) {
        return Err(invalid(
            "falcon: `alibi: true` (Falcon-RW's ALiBi attention) is not supported".into(),
        ));
    }
    let false_ = Value::Bool(false);
    f.only(
        "apply_residual_connection_post_layernorm",
        &false_,
        "falcon",
    )?;
    let new = match (architecture, f.bool("new_decoder_architecture")?) {
        (Some(implied), Some(given)) if implied != given => {
            return Err(invalid(format!(
                "{model_type}: `new_decoder_architecture: {given}` contradicts the model_type"
            )))
        }
        (Some(implied), _) => implied,
        (None, given) => given.unwrap_or(false),
    };
    let multi_query = f.bool("multi_query")?.unwrap_or(true);
    let parallel = f.bool("parallel_attn")?.unwrap_or(true);
    let bias = f.bool("bias")?.unwrap_or(false);
    let norms_in_parallel = f.usize("num_ln_in_parallel_attn")?;
    let mut config = decoder(
        f,
        model_type,
        Defaults {
            tie_word_embeddings: true,
            reads_head_dim: false,
            intermediate_key: Some("ffn_hidden_size"),
            intermediate_per_hidden: Some(4),
            hidden_act: "gelu",
            ..Defaults::EPS_1E5
        },
    )?;
    // Only the new decoder reads `num_kv_heads`; the original one has one key/value head per
    // query head, or a single one with `multi_query`.
    if !new {
        let given = config.num_kv_heads;
        config.num_kv_heads = if multi_query { 1 } else { config.num_heads };
        if !multi_query && given != config.num_heads {
            return Err(invalid(format!(
                "falcon: num_kv_heads ({given}) must equal the heads ({}) without multi_query in the original architecture",
                config.num_heads
            )));
        }
    }
    let norms = match (new, parallel, norms_in_parallel) {
        (true, false, _) => {
            return Err(invalid(
                "falcon: the new decoder architecture needs `parallel_attn: true`".into(),
            ))
        }
        (true, true, None | Some(2)) => NormNames::pre_norm("ln_attn", "ln_mlp"),
        (_, true, None | Some(1)) => NormNames::pre_norm("input_layernorm", "input_layernorm"),
        (false, false, _) => NormNames::pre_norm("input_layernorm", "post_attention_layernorm"),
        (_, true, Some(n)) => {
            return Err(invalid(format!(
                "falcon: `num_ln_in_parallel_attn: {n}` is not supported (1, or 2 with the new decoder architecture)"
            )))
        }
    };
    config.residual = if parallel {
        Residual::Parallel
    } else {
        Residual::PreNorm
    };
    gpt_layer(&mut config, bias);
    config.layout = Layout {
        embed_norm: None,
        norms,
        ..bloom::LAYOUT
    };
    Ok(config)
}
