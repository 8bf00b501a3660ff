//! v2243 `qk-norm`: RMSNorm of queries and keys before the rotary embedding, with their own
//! learned gains: per head (Qwen3) or over the whole projection (OLMo 2).

use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{BuildContext, Factory, Norm};

use super::rmsnorm::RmsNormOp;

pub struct QkNorm;

vibee_core::operator_plugin!(QkNorm, "v2243", "qk-norm", QkNorm);

impl Factory<dyn Norm> for QkNorm {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        if config.qk_norm.is_some() {
            Ok(())
        } else {
            Err(format!(
                "model_type {} has no q_norm/k_norm weights",
                config.model_type
            ))
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
