//! v2246 `parallel-residual`: attention and feed-forward both read the layer's input, each
//! through its own norm, and both add to the residual stream:
//! `out = x + attn(norm(x)) + ffn(norm'(x))` (GPT-NeoX, Falcon).

use std::sync::Arc;

use vibee_core::config::{ModelConfig, NormSite, Residual};
use vibee_core::ops::{BuildContext, Factory, Operator, Residual as Arrangement};
use vibee_core::{App, Matrix, Plugin, PluginSpec};

pub struct ParallelResidual;

impl Plugin for ParallelResidual {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2246",
            name: "parallel-residual",
        }
    }

    fn build(&self, app: &mut App) {
        app.register_operator(Operator::Residual(Arc::new(ParallelResidual)));
    }
}

impl Factory<dyn Arrangement> for ParallelResidual {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match config.residual {
            Residual::Parallel => Ok(()),
            other => Err(super::placement_mismatch(config, other)),
        }
    }

    fn build(
        &self,
        _cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Arrangement>> {
        Ok(Box::new(ParallelResidual))
    }
}

impl Arrangement for ParallelResidual {
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
        let fed = ffn(&norm(NormSite::FfnIn, x));
        x.add_assign(&attended);
        x.add_assign(&fed);
    }
}
