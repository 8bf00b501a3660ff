//! v2223 `nope`: no position encoding in the layers the checkpoint marks — their attention sees
//! only causal order (SmolLM3's `no_rope_layers`; Llama 4's interleaved NoPE layers). The other
//! layers keep the model's position encoding.

use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{BuildContext, Factory, NoPosition};

pub struct Nope;

vibee_core::operator_plugin!(Nope, "v2223", "nope", Nope);

impl Factory<dyn NoPosition> for Nope {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        if config.nope_layers.iter().any(|n| *n) {
            Ok(())
        } else {
            Err(format!(
                "model_type {} encodes positions in every layer (no no_rope_layers)",
                config.model_type
            ))
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn NoPosition>> {
        Ok(Box::new(NopeLayers(cx.config.nope_layers.clone())))
    }
}

struct NopeLayers(Vec<bool>);

impl NoPosition for NopeLayers {
    fn skips(&self, layer: usize) -> bool {
        self.0.get(layer).copied().unwrap_or(false)
    }
}
