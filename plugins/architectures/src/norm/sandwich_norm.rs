//! v2247 `sandwich-norm`: norms both before and after each sub-layer: `h = x + norm(attn(norm(x)))`, `out = h + norm(ffn(norm(h)))` (Gemma 2).

use std::sync::Arc;

use vibee_core::config::{ModelConfig, NormSite, Residual};
use vibee_core::ops::{BuildContext, Factory, Operator, Residual as Arrangement};
use vibee_core::{App, Matrix, Plugin, PluginSpec};

pub struct SandwichNorm;

impl Plugin for SandwichNorm {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2247",
            name: "sandwich-norm",
        }
    }

    fn build(&self, app: &mut App) {
        app.register_operator(Operator::Residual(Arc::new(SandwichNorm)));
    }
}

impl Factory<dyn Arrangement> for SandwichNorm {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match config.residual {
            Residual::Sandwich => Ok(()),
            other => Err(super::placement_mismatch(config, other)),
        }
    }

    fn build(
        &self,
        _cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Arrangement>> {
        Ok(Box::new(SandwichNorm))
    }
}

impl Arrangement for SandwichNorm {
    fn sites(&self) -> &'static [NormSite] {
        &[
            NormSite::AttnIn,
            NormSite::AttnOut,
            NormSite::FfnIn,
            NormSite::FfnOut,
        ]
    }

    fn layer(
        &self,
        x: &mut Matrix,
        norm: &dyn Fn(NormSite, &Matrix) -> Matrix,
        attention: &mut dyn FnMut(&Matrix) -> Matrix,
        ffn: &dyn Fn(&Matrix) -> Matrix,
    ) {
        let attended = attention(&norm(NormSite::AttnIn, x));
        x.add_assign(&norm(NormSite::AttnOut, &attended));
        let fed = ffn(&norm(NormSite::FfnIn, x));
        x.add_assign(&norm(NormSite::FfnOut, &fed));
    }
}
