//! v2261 `geglu`: the gated GELU feed-forward, `down(gelu(gate(x)) · up(x))` (Gemma), with the
//! exact (erf) GELU or its tanh approximation as the checkpoint's `hidden_act` says.

use vibee_core::config::ModelConfig;
use vibee_core::ops::{BuildContext, Factory, Ffn};

use super::gated::GatedFfn;

pub struct GeGlu;

vibee_core::operator_plugin!(GeGlu, "v2261", "geglu", Ffn);

/// The GELU variant a `hidden_act` names.
pub fn activation(name: &str) -> Option<fn(f32) -> f32> {
    match name {
        "gelu" => Some(gelu_erf),
        "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(gelu_tanh),
        _ => None,
    }
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

pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x / std::f32::consts::SQRT_2))
}

pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_variants_match_published_values() {
        // torch.nn.functional.gelu(torch.tensor([1.0, -0.5]), approximate=...)
        assert!((gelu_erf(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu_erf(-0.5) + 0.154_268_88).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841_191_97).abs() < 1e-6);
    }
}
