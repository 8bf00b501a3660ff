//! Norm family (v2240–v2259): the norms themselves and where a layer places them.

pub mod arrangement;
pub mod layernorm;
pub mod offset_rmsnorm;
pub mod parallel_residual;
pub mod post_norm;
pub mod pre_norm;
pub mod qk_norm;
pub mod rmsnorm;
pub mod sandwich_norm;

use vibee_core::config::{ModelConfig, NormKind, Residual};

/// Why a norm plugin does not fit a checkpoint whose norm is `found`.
fn mismatch(config: &ModelConfig, found: NormKind) -> String {
    let plugin = match found {
        NormKind::Rms => "rmsnorm",
        NormKind::RmsUnitOffset => "offset-rmsnorm",
        NormKind::Layer { .. } => "layernorm",
    };
    format!(
        "model_type {} normalises with {found:?} (use `{plugin}`)",
        config.model_type
    )
}

/// Why a residual arrangement does not fit a checkpoint arranged as `found`.
fn placement_mismatch(config: &ModelConfig, found: Residual) -> String {
    let plugin = match found {
        Residual::PreNorm => "pre-norm",
        Residual::Sandwich => "sandwich-norm",
        Residual::PostNorm => "post-norm",
        Residual::Parallel => "parallel-residual",
    };
    format!(
        "model_type {} places its norms as {found:?} (use `{plugin}`)",
        config.model_type
    )
}
