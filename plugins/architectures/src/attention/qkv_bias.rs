//! v2206 `qkv-bias`: learned biases added to the query, key and value projections (Qwen2), and
//! to the output projection where the checkpoint has one (StarCoder2).

use std::sync::Arc;

use vibee_core::backend::Backend;
use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{Bias, BuildContext, Factory};
use vibee_core::Matrix;

pub struct QkvBias;

vibee_core::operator_plugin!(QkvBias, "v2206", "qkv-bias", QkvBias);

impl Factory<dyn Bias> for QkvBias {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        if config.qkv_bias || config.o_bias {
            Ok(())
        } else {
            Err(format!(
                "model_type {} has no q/k/v projection biases",
                config.model_type
            ))
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        prefix: &str,
        dim: usize,
    ) -> anyhow::Result<Box<dyn Bias>> {
        Ok(Box::new(VectorBias(
            cx.vector(&format!("{prefix}.bias"), dim)?,
            cx.backend.clone(),
        )))
    }
}

struct VectorBias(Vec<f32>, Arc<dyn Backend>);

impl Bias for VectorBias {
    fn apply(&self, x: &mut Matrix) {
        self.1.add_row(x, &self.0);
    }
}
