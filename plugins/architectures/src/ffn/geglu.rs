//! v2261 `geglu`: the gated GELU feed-forward, `down(gelu(gate(x)) · up(x))` (Gemma), with the
//! exact (erf) GELU or its tanh approximation as the checkpoint's `hidden_act` says.

use vibee_core::backend::Activation;
use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{BuildContext, Factory, Ffn};

use super::gated::GatedFfn;

pub struct GeGlu;

vibee_core::operator_plugin!(GeGlu, "v2261", "geglu", Ffn);

/// The GELU variant a `hidden_act` names.
fn activation(name: &str) -> Option<Activation> {
    Activation::from_name(name).filter(|a| a.is_gelu())
}

impl Factory<dyn Ffn> for GeGlu {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match activation(&config.hidden_act) {
            Some(_) => super::dense_only(config),
            None => Err(format!(
                "config.json hidden_act = \"{}\" but geglu needs a GELU (gelu, gelu_pytorch_tanh)",
                config.hidden_act
            )),
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Ffn>> {
        let act = activation(&cx.config.hidden_act).expect("checked before building");
        Ok(Box::new(GatedFfn::build(cx, prefix, act)?))
    }
}
