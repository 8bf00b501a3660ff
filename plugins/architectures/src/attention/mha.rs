//! v2200 `mha`: multi-head attention, one key/value head per query head.

use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{Attention, BuildContext, Factory};

use super::causal::CausalAttention;

pub struct Mha;

vibee_core::operator_plugin!(Mha, "v2200", "mha", Attention);

impl Factory<dyn Attention> for Mha {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        super::projected_only(config)?;
        if config.num_kv_heads == config.num_heads {
            Ok(())
        } else {
            Err(format!(
                "config.json num_key_value_heads = {} but mha needs it equal to num_attention_heads = {} (use `gqa` or `mqa`)",
                config.num_kv_heads, config.num_heads
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
