//! Quantization (v2340–v2359): how linear layers store and multiply their weights.

pub mod gguf;
pub mod int8;
pub mod q4;

use vibee_core::config::ModelConfig;
use vibee_core::weights::Weight;

/// Quantizers that start from full-precision weights refuse checkpoints stored quantized.
fn full_precision(config: &ModelConfig, plugin: &str) -> Result<(), String> {
    match config.quantization {
        None => Ok(()),
        Some(stored) => Err(format!(
            "the checkpoint is stored quantized (needs `{stored}`); {plugin} quantizes full-precision weights"
        )),
    }
}

/// A weight whose rows split into whole quantization groups of `group` elements.
fn whole_blocks(name: &str, weight: &Weight, group: usize) -> anyhow::Result<()> {
    let cols = weight.shape[1];
    if !cols.is_multiple_of(group) {
        anyhow::bail!("`{name}` has {cols} columns, not a multiple of the group size {group}");
    }
    Ok(())
}
