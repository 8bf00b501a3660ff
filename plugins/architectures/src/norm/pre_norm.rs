//! v2244 `pre-norm`: each sub-layer reads a normalised copy of the residual stream and adds its output back: `h = x + attn(norm(x))`, `out = h + ffn(norm(h))` (Llama, Mistral, Qwen, Gemma).

use std::sync::Arc;

use vibee_core::config::{ModelConfig, NormSite, Residual};
use vibee_core::ops::{BuildContext, Factory, Operator, Residual as Arrangement};
use vibee_core::{App, Matrix, Plugin, PluginSpec};

pub struct PreNorm;

impl Plugin for PreNorm {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2244",
            name: "pre-norm",
        }
    }

    fn build(&self, app: &mut App) {
        app.register_operator(Operator::Residual(Arc::new(PreNorm)));
    }
}

impl Factory<dyn Arrangement> for PreNorm {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match config.residual {
            Residual::PreNorm => Ok(()),
            other => Err(super::placement_mismatch(config, other)),
        }
    }

    fn build(
        &self,
        _cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Arrangement>> {
        Ok(Box::new(PreNorm))
    }
}

impl Arrangement for PreNorm {
    fn sites(&self) -> &'static [NormSite] {
        &[NormSite::AttnIn, NormSite::FfnIn]
    }

    fn layer(
        &self,
        x: &mut Matrix,
        norm: &dyn Fn(NormSite, &Matrix) -> Matrix,
        attention: &mut dyn FnMut(&Matrix) -> Matrix,
        ffn: &dyn Fn(&Matrix) -> Matrix,
    ) {
        let attended = attention(&norm(NormSite::AttnIn, x));
        x.add_assign(&attended);
        let fed = ffn(&norm(NormSite::FfnIn, x));
        x.add_assign(&fed);
    }
}
