//! v2241 `layernorm`: `(x − mean) / sqrt(var + eps) · weight + bias` over each row, with or
//! without the bias (StarCoder2, GPT-2, GPT-NeoX, Falcon, BLOOM).

use std::sync::Arc;

use vibee_core::backend::Backend;
use vibee_core::config::{ModelConfig, NormKind};
use vibee_core::model::ops::{BuildContext, Factory, Norm};
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
            backend: cx.backend.clone(),
        }))
    }
}

struct LayerNormOp {
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    eps: f32,
    backend: Arc<dyn Backend>,
}

impl Norm for LayerNormOp {
    fn forward(&self, x: &Matrix) -> Matrix {
        let bias = self.bias.as_deref();
        self.backend.layer_norm(x, &self.weight, bias, self.eps)
    }

    fn dim(&self) -> usize {
        self.weight.len()
    }
}
