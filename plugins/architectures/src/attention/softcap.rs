//! v2207 `softcap`: attention scores and final logits pass through `cap · tanh(x / cap)`, with
//! the caps the checkpoint sets (Gemma 2: `attn_logit_softcapping`, `final_logit_softcapping`).

use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{BuildContext, Factory, Softcap as Caps};

pub struct Softcap;

vibee_core::operator_plugin!(Softcap, "v2207", "softcap", Softcap);

impl Factory<dyn Caps> for Softcap {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        if config.attn_softcap.is_some() || config.final_softcap.is_some() {
            Ok(())
        } else {
            Err(
                "config.json sets neither attn_logit_softcapping nor final_logit_softcapping"
                    .into(),
            )
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Caps>> {
        Ok(Box::new(CheckpointCaps {
            attention: cx.config.attn_softcap.map(|c| c as f32),
            logits: cx.config.final_softcap.map(|c| c as f32),
        }))
    }
}

struct CheckpointCaps {
    attention: Option<f32>,
    logits: Option<f32>,
}

impl Caps for CheckpointCaps {
    fn attention(&self) -> Option<f32> {
        self.attention
    }

    fn logits(&self) -> Option<f32> {
        self.logits
    }
}
