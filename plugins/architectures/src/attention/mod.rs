//! Attention family (v2200–v2219).

pub mod causal;
pub mod flash;
pub mod gqa;
pub mod mha;
pub mod mla;
pub mod mqa;
pub mod qkv_bias;
pub mod sliding_window;
pub mod softcap;

use vibee_core::config::ModelConfig;

/// Kernels over projected queries, keys and values refuse latent-attention checkpoints.
fn projected_only(config: &ModelConfig) -> Result<(), String> {
    match config.mla {
        Some(_) => Err(format!(
            "model_type {} uses latent attention (use `mla`)",
            config.model_type
        )),
        None => Ok(()),
    }
}
