//! FFN family (v2260–v2279).

pub mod gated;
pub mod geglu;
pub mod mlp;
pub mod moe;
pub mod swiglu;

use vibee_core::config::ModelConfig;

/// Dense feed-forward plugins refuse checkpoints whose layers route to experts.
fn dense_only(config: &ModelConfig) -> Result<(), String> {
    match config.moe {
        Some(_) => Err(format!(
            "model_type {} routes tokens to experts (use `moe`)",
            config.model_type
        )),
        None => Ok(()),
    }
}
