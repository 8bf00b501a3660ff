//! v2205 `flash-attention`: the same causal attention as `gqa` (any grouping of query heads per
//! key/value head, sliding windows, ALiBi, soft caps), computed tile by tile with an online
//! softmax so no query ever holds its full row of scores.

use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{Attention, BuildContext, Factory};

use super::causal::CausalAttention;

/// Keys per tile: a tile of scores and its value rows stay in L1 for head_dim up to 128.
const TILE: usize = 64;

pub struct FlashAttention;

vibee_core::operator_plugin!(FlashAttention, "v2205", "flash-attention", Attention);

impl Factory<dyn Attention> for FlashAttention {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        super::gqa::Gqa.check(config)
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Attention>> {
        Ok(Box::new(CausalAttention::new(cx).tiled(TILE)))
    }
}
