//! v2240 `rmsnorm`: root-mean-square layer norm, `x / sqrt(mean(x²) + eps) · weight`.

use rayon::prelude::*;
use vibee_core::config::{ModelConfig, NormKind};
use vibee_core::ops::{BuildContext, Factory, Norm};
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
        Ok(Box::new(RmsNormOp::new(
            cx.vector(&format!("{prefix}.weight"), dim)?,
            cx.config.rms_norm_eps,
        )))
    }
}

/// The RMSNorm kernel, shared by every RMSNorm-based technique (they differ in the gain).
pub struct RmsNormOp {
    gain: Vec<f32>,
    eps: f32,
}

impl RmsNormOp {
    pub fn new(gain: Vec<f32>, eps: f64) -> Self {
        Self {
            gain,
            eps: eps as f32,
        }
    }
}

impl Norm for RmsNormOp {
    fn forward(&self, x: &Matrix) -> Matrix {
        let mut out = x.clone();
        let rows = out.data.par_chunks_mut(x.cols);
        rows.with_min_len(64).for_each(|row| {
            let mean_square = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let inv = 1.0 / (mean_square + self.eps).sqrt();
            for (v, g) in row.iter_mut().zip(&self.gain) {
                *v = g * (*v * inv);
            }
        });
        out
    }

    fn dim(&self) -> usize {
        self.gain.len()
    }
}
