//! v2202 `gqa`: grouped-query attention, each key/value head shared by a group of query heads.
//! It generalises `mha` (groups of one) and `mqa` (one group), so it fits both.

use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{Attention, BuildContext, Factory};

use super::causal::CausalAttention;

pub struct Gqa;

vibee_core::operator_plugin!(Gqa, "v2202", "gqa", Attention);

impl Factory<dyn Attention> for Gqa {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        super::projected_only(config)?;
        if config.num_heads.is_multiple_of(config.num_kv_heads) {
            Ok(())
        } else {
            Err(format!(
                "config.json num_attention_heads = {} is not a multiple of num_key_value_heads = {}",
                config.num_heads, config.num_kv_heads
            ))
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Attention>> {
        Ok(Box::new(CausalAttention::new(cx)))
    }
}
