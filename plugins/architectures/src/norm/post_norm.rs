//! v2245 `post-norm`: each sub-layer reads the raw residual stream and its output is normalised before it is added back: `h = x + norm(attn(x))`, `out = h + norm(ffn(h))` (OLMo 2).

use std::sync::Arc;

use vibee_core::config::{ModelConfig, NormSite, Residual};
use vibee_core::ops::{BuildContext, Factory, Operator, Residual as Arrangement};
use vibee_core::{App, Matrix, Plugin, PluginSpec};

pub struct PostNorm;

impl Plugin for PostNorm {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2245",
            name: "post-norm",
        }
    }

    fn build(&self, app: &mut App) {
        app.register_operator(Operator::Residual(Arc::new(PostNorm)));
    }
}

impl Factory<dyn Arrangement> for PostNorm {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match config.residual {
            Residual::PostNorm => Ok(()),
            other => Err(super::placement_mismatch(config, other)),
        }
    }

    fn build(
        &self,
        _cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Arrangement>> {
        Ok(Box::new(PostNorm))
    }
}

impl Arrangement for PostNorm {
    fn sites(&self) -> &'static [NormSite] {
        &[NormSite::AttnOut, NormSite::FfnOut]
    }

    fn layer(
        &self,
        x: &mut Matrix,
        norm: &dyn Fn(NormSite, &Matrix) -> Matrix,
        attention: &mut dyn FnMut(&Matrix) -> Matrix,
        ffn: &dyn Fn(&Matrix) -> Matrix,
    ) {
        let attended = attention(x);
        x.add_assign(&norm(NormSite::AttnOut, &attended));
        let fed = ffn(x);
        x.add_assign(&norm(NormSite::FfnOut, &fed));
    }
}
