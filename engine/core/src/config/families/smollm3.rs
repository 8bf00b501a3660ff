//! SmolLM3: Llama with no position encoding at all in every fourth layer (NoPE) and Qwen's
//! optional sliding window.

use serde_json::Value;

use super::{decoder, sliding_window, Defaults, Family, Fields, GgufForm, Sliding};
use crate::config::fields::invalid;
use crate::config::{ConfigError, ModelConfig};

pub static FAMILY: Family = Family {
    model_type: "smollm3",
    aliases: &[],
    inert: &[],
    read,
    gguf: Some(GgufForm {
        architecture: "smollm3",
        stored,
        ..GgufForm::PLAIN
    }),
};

/// The converter permutes each head's q/k rows as for Llama (rotary pairs become neighbours)
/// and writes no NoPE layers: llama.cpp leaves out the position encoding of every fourth layer.
fn stored(config: &mut ModelConfig) {
    config.rope_interleaved = true;
    config.nope_layers = (0..config.num_layers).map(|i| (i + 1) % 4 == 0).collect();
}

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let mut config = decoder(
        f,
        "smollm3",
        Defaults {
            tie_word_embeddings: true,
            rope_theta: 2e6,
            ..Defaults::LLAMA
        },
    )?;
    config.nope_layers = no_position_layers(f, config.num_layers)?;
    // The window, when enabled, covers exactly the NoPE layers.
    let nope = Sliding::Layers(config.nope_layers.clone());
    sliding_window(f, nope, None, &mut config)?;
    Ok(config)
}

/// `no_rope_layers[i]` is 1 where layer `i` uses rotary embeddings and 0 where it uses none;
/// without the list, every `no_rope_layer_interval`-th (4th by default) layer is NoPE.
fn no_position_layers(f: &mut Fields, layers: usize) -> Result<Vec<bool>, ConfigError> {
    let interval = f.usize("no_rope_layer_interval")?.unwrap_or(4);
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
            .map(|i| interval > 0 && (i + 1) % interval == 0)
            .collect()),
    }
}
