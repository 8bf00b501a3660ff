//! v2240 `rmsnorm`: root-mean-square layer norm, `x / sqrt(mean(x²) + eps) · weight`.

use std::sync::Arc;

use rayon::prelude::*;
use vibee_core::config::ModelConfig;
use vibee_core::ops::{BuildContext, Factory, Norm, Operator};
use vibee_core::{App, Matrix, Plugin, PluginSpec};

pub struct RmsNorm;

impl Plugin for RmsNorm {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2240",
            name: "rmsnorm",
        }
    }

    fn build(&self, app: &mut App) {
        app.register_operator(Operator::Norm(Arc::new(RmsNorm)));
    }
}

impl Factory<dyn Norm> for RmsNorm {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        if config.rms_norm_eps >= 0.0 {
            Ok(())
        } else {
            Err(format!(
                "config.json rms_norm_eps = {} must not be negative",
                config.rms_norm_eps
            ))
        }
    }

    fn build(&self, cx: &BuildContext<'_>, prefix: &str) -> anyhow::Result<Box<dyn Norm>> {
        let weight = cx.weight(&format!("{prefix}.weight"), &[cx.config.hidden_size])?;
        Ok(Box::new(RmsNormOp {
            weight: weight.to_f32_vec(),
            eps: cx.config.rms_norm_eps as f32,
        }))
    }
}

struct RmsNormOp {
    weight: Vec<f32>,
    eps: f32,
}

impl Norm for RmsNormOp {
    fn forward(&self, x: &Matrix) -> Matrix {
        let mut out = x.clone();
        out.data.par_chunks_mut(x.cols).for_each(|row| {
            let mean_square = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let inv = 1.0 / (mean_square + self.eps).sqrt();
            for (v, w) in row.iter_mut().zip(&self.weight) {
                *v = w * (*v * inv);
            }
        });
        out
    }
}
