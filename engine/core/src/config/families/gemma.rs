//! Gemma (1, 1.1, CodeGemma): RMSNorm gains stored as offsets from one, embeddings scaled by
//! √hidden_size, GeGLU, tied embeddings, 256-wide heads unless the config says otherwise.

use super::{decoder, gemma_activation, Defaults, Family, Fields, GgufForm};
use crate::config::{ConfigError, ModelConfig, NormKind};

pub static FAMILY: Family = Family {
    model_type: "gemma",
    aliases: &[],
    inert: &[],
    read,
    // The converter stores every norm gain as 1 + w, a plain RMSNorm's gain.
    gguf: Some(GgufForm {
        architecture: "gemma",
        stored: |config| config.norm = NormKind::Rms,
        ..GgufForm::PLAIN
    }),
};

/// transformers' Gemma defaults.
pub const DEFAULTS: Defaults = Defaults {
    tie_word_embeddings: true,
    head_dim: Some(256),
    intermediate_per_hidden: None,
    hidden_act: "gelu_pytorch_tanh",
    ..Defaults::LLAMA
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let mut config = decoder(f, "gemma", DEFAULTS)?;
    config.hidden_act = gemma_activation(f, &config.hidden_act)?;
    config.norm = NormKind::RmsUnitOffset;
    config.embedding_scale = Some((config.hidden_size as f64).sqrt() as f32);
    Ok(config)
}
