//! v2240 `rmsnorm`: root-mean-square layer norm, `x / sqrt(mean(x²) + eps) · weight`.

use std::sync::Arc;

use vibee_core::backend::Backend;
use vibee_core::config::{ModelConfig, NormKind};
use vibee_core::model::ops::{BuildContext, Factory, Norm};
use vibee_core::Matrix;

pub struct RmsNorm;

vibee_core::operator_plugin!(RmsNorm, "v2240", "rmsnorm", Norm);

impl Factory<dyn Norm> for RmsNorm {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match config.norm {
            NormKind::Rms => Ok(()),
            other => Err(super::mismatch(config, other)),
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        prefix: &str,
        dim: usize,
    ) -> anyhow::Result<Box<dyn Norm>> {
        Ok(Box::new(RmsNormOp::load(cx, prefix, dim, 0.0)?))
    }
}

/// The RMSNorm kernel, shared by every RMSNorm-based technique (they differ in the gain).
pub struct RmsNormOp {
    gain: Vec<f32>,
    eps: f32,
    backend: Arc<dyn Backend>,
}

impl RmsNormOp {
    /// The norm whose gain is `{name}.weight` plus `offset` (1 for Gemma's `(1 + w)`), with
    /// the checkpoint's epsilon.
    pub fn load(
        cx: &BuildContext<'_>,
        name: &str,
        dim: usize,
        offset: f32,
    ) -> anyhow::Result<Self> {
        let gain = cx
            .vector(&format!("{name}.weight"), dim)?
            .into_iter()
            .map(|w| w + offset)
            .collect();
        Ok(Self {
            gain,
            eps: cx.config.rms_norm_eps as f32,
            backend: cx.backend.clone(),
        })
    }
}

impl Norm for RmsNormOp {
    fn forward(&self, x: &Matrix) -> Matrix {
        self.backend.rms_norm(x, &self.gain, self.eps)
    }

    fn dim(&self) -> usize {
        self.gain.len()
    }
}
