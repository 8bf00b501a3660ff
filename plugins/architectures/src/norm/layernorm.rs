//! v2241 `layernorm`: `(x − mean) / sqrt(var + eps) · weight + bias` over each row, with or
//! without the bias (StarCoder2, GPT-2, GPT-NeoX, Falcon, BLOOM).

use rayon::prelude::*;
use vibee_core::config::{ModelConfig, NormKind};
use vibee_core::ops::{BuildContext, Factory, Norm};
use vibee_core::Matrix;

pub struct LayerNorm;

vibee_core::operator_plugin!(LayerNorm, "v2241", "layernorm", Norm);

impl Factory<dyn Norm> for LayerNorm {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match config.norm {
            NormKind::Layer { .. } => Ok(()),
            other => Err(super::mismatch(config, other)),
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        prefix: &str,
        dim: usize,
    ) -> anyhow::Result<Box<dyn Norm>> {
        let bias = match cx.config.norm {
            NormKind::Layer { bias: true } => Some(cx.vector(&format!("{prefix}.bias"), dim)?),
            _ => None,
        };
        Ok(Box::new(LayerNormOp {
            weight: cx.vector(&format!("{prefix}.weight"), dim)?,
            bias,
            eps: cx.config.rms_norm_eps as f32,
        }))
    }
}

struct LayerNormOp {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    eps: f32,
}

impl Norm for LayerNormOp {
    fn forward(&self, x: &Matrix) -> Matrix {
        let mut out = x.clone();
        out.data
            .par_chunks_mut(x.cols)
            .with_min_len(64)
            .for_each(|row| {
                let n = row.len() as f32;
                let mean = row.iter().sum::<f32>() / n;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
                let inv = 1.0 / (var + self.eps).sqrt();
                for (i, v) in row.iter_mut().enumerate() {
                    *v = (*v - mean) * inv * self.weight[i]
                        + self.bias.as_ref().map_or(0.0, |b| b[i]);
                }
            });
        out
    }

    fn dim(&self) -> usize {
        self.weight.len()
    }
}
