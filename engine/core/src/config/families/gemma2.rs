//! Gemma 2: Gemma with norms before and after each sub-layer, soft-capped attention scores and
//! logits, queries scaled by `query_pre_attn_scalar`, and a sliding window on every other layer.

use super::{decoder, gemma::DEFAULTS, sliding_window, Family, Fields, GgufForm, Sliding};
use crate::config::fields::invalid;
use crate::config::{ConfigError, ModelConfig, NormKind, NormNames, Residual};

pub static FAMILY: Family = Family {
    model_type: "gemma2",
    aliases: &[],
    inert: &[],
    read,
    gguf: Some(GgufForm {
        architecture: "gemma2",
        metadata: &[
            ("attn_logit_softcapping", "attn_logit_softcapping"),
            ("final_logit_softcapping", "final_logit_softcapping"),
            ("attention.sliding_window", "sliding_window"),
        ],
        stored,
        ..GgufForm::PLAIN
    }),
};

/// The converter stores every norm gain as 1 + w (a plain RMSNorm's gain) and drops
/// `query_pre_attn_scalar`, for which llama.cpp takes head_dim, or hidden / heads in the
/// 46-layer Gemma 2 27B.
fn stored(config: &mut ModelConfig) {
    config.norm = NormKind::Rms;
    let scalar = match config.num_layers {
        46 => config.hidden_size / config.num_heads,
        _ => config.head_dim,
    };
    config.query_pre_attn_scalar = Some(scalar as f64);
}

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let mut config = decoder(f, "gemma2", DEFAULTS)?;
    // Gemma 2's MLP reads `hidden_activation`; `hidden_act` is a leftover it ignores.
    config.hidden_act = f
        .string("hidden_activation")?
        .unwrap_or_else(|| "gelu_pytorch_tanh".into());
    config.norm = NormKind::RmsUnitOffset;
    config.embedding_scale = Some((config.hidden_size as f64).sqrt() as f32);
    config.residual = Residual::Sandwich;
    config.layout.norms = NormNames {
        attn_in: Some("input_layernorm"),
        attn_out: Some("post_attention_layernorm"),
        ffn_in: Some("pre_feedforward_layernorm"),
        ffn_out: Some("post_feedforward_layernorm"),
    };
    // transformers' defaults where a key is absent; null turns soft-capping off.
    let mut or_default = |key, default| -> Result<Option<f64>, ConfigError> {
        Ok(match f.positive(key)? {
            None if !f.present(key) => Some(default),
            given => given,
        })
    };
    config.attn_softcap = or_default("attn_logit_softcapping", 50.0)?;
    config.final_softcap = or_default("final_logit_softcapping", 30.0)?;
    config.query_pre_attn_scalar = or_default("query_pre_attn_scalar", 256.0)?;
    // The first Gemma 2 configs also carry the window under its old name.
    let legacy = f.usize("sliding_window_size")?;
    let window = f.usize("sliding_window")?;
    if let (Some(old), Some(new)) = (legacy, window) {
        if old != new {
            return Err(invalid(format!(
                "gemma2: sliding_window_size ({old}) and sliding_window ({new}) disagree"
            )));
        }
    }
    sliding_window(f, Sliding::Alternating, legacy.or(Some(4096)), &mut config)?;
    Ok(config)
}
