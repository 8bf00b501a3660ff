//! v2242 `offset-rmsnorm`: RMSNorm whose stored weight is an offset from one,
//! `x / sqrt(mean(x²) + eps) · (1 + weight)` (Gemma). The offset is folded in at load time.

use vibee_core::config::{ModelConfig, NormKind};
use vibee_core::model::ops::{BuildContext, Factory, Norm};

use super::rmsnorm::RmsNormOp;

pub struct OffsetRmsNorm;

vibee_core::operator_plugin!(OffsetRmsNorm, "v2242", "offset-rmsnorm", Norm);

impl Factory<dyn Norm> for OffsetRmsNorm {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match config.norm {
            NormKind::RmsUnitOffset => Ok(()),
            other => Err(super::mismatch(config, other)),
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        prefix: &str,
        dim: usize,
    ) -> anyhow::Result<Box<dyn Norm>> {
        Ok(Box::new(RmsNormOp::load(cx, prefix, dim, 1.0)?))
    }
}
