//! v2201 `mqa`: multi-query attention, one key/value head shared by all query heads.

use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{Attention, BuildContext, Factory};

use super::causal::CausalAttention;

pub struct Mqa;

vibee_core::operator_plugin!(Mqa, "v2201", "mqa", Attention);

impl Factory<dyn Attention> for Mqa {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        super::projected_only(config)?;
        if config.num_kv_heads == 1 {
            Ok(())
        } else {
            Err(format!(
                "config.json num_key_value_heads = {} but mqa needs 1 (use `gqa` or `mha`)",
                config.num_kv_heads
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
