//! Qwen3: Qwen2 without q/k/v biases and with an RMSNorm of each query and key head
//! (`q_norm`, `k_norm`) before the rotary embedding.

use super::{decoder, sliding_window, Defaults, Family, Fields, GgufForm, Sliding};
use crate::config::{ConfigError, ModelConfig, QkNormScope};

pub static FAMILY: Family = Family {
    model_type: "qwen3",
    aliases: &[],
    inert: &[],
    read,
    gguf: GgufForm::plain("qwen3"),
};

/// transformers' Qwen3 `head_dim` when a config leaves it out.
pub const DEFAULTS: Defaults = Defaults {
    head_dim: Some(128),
    ..Defaults::LLAMA
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    qwen3(f, "qwen3", Sliding::Qwen)
}

/// Qwen3's attention, shared with Qwen3-MoE (whose window, when enabled, covers every layer).
pub fn qwen3(
    f: &mut Fields,
    model_type: &str,
    sliding: Sliding,
) -> Result<ModelConfig, ConfigError> {
    let mut config = decoder(f, model_type, DEFAULTS)?;
    config.qk_norm = Some(QkNormScope::PerHead);
    sliding_window(f, sliding, Some(4096), &mut config)?;
    Ok(config)
}
