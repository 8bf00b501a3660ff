//! v2260 `swiglu`: the gated SiLU feed-forward, `down(silu(gate(x)) · up(x))`.

use vibee_core::backend::Activation;
use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{BuildContext, Factory, Ffn};

use super::gated::GatedFfn;

pub struct SwiGlu;

vibee_core::operator_plugin!(SwiGlu, "v2260", "swiglu", Ffn);

impl Factory<dyn Ffn> for SwiGlu {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        if config.hidden_act == "silu" {
            super::dense_only(config)
        } else {
            Err(format!(
                "config.json hidden_act = \"{}\" but swiglu needs \"silu\"",
                config.hidden_act
            ))
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Ffn>> {
        Ok(Box::new(GatedFfn::build(cx, prefix, Activation::Silu)?))
    }
}
