//! What the residual-arrangement plugins share: each is a [`Arrangement`] value naming its
//! spec, the checkpoint arrangement it fits, the norms it uses and how it runs a layer.

use std::sync::Arc;

use vibee_core::config::{ModelConfig, NormSite, Residual};
use vibee_core::model::ops::{BuildContext, Factory, Operator, Residual as Layer};
use vibee_core::{App, Matrix, Plugin, PluginSpec};

/// One layer: `x` in place, with the layer's norms by site, its attention and feed-forward.
pub type LayerFn = fn(
    x: &mut Matrix,
    norm: &dyn Fn(NormSite, &Matrix) -> Matrix,
    attention: &mut dyn FnMut(&Matrix) -> Matrix,
    ffn: &dyn Fn(&Matrix) -> Matrix,
);

#[derive(Clone, Copy)]
pub struct Arrangement {
    pub spec: PluginSpec,
    pub fits: Residual,
    pub sites: &'static [NormSite],
    pub layer: LayerFn,
}

impl Plugin for Arrangement {
    fn spec(&self) -> PluginSpec {
        self.spec
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        app.register_operator(Operator::Residual(Arc::new(*self)));
        Ok(())
    }
}

impl Factory<dyn Layer> for Arrangement {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        if config.residual == self.fits {
            Ok(())
        } else {
            Err(super::placement_mismatch(config, config.residual))
        }
    }

    fn build(
        &self,
        _cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Layer>> {
        Ok(Box::new(*self))
    }
}

impl Layer for Arrangement {
    fn sites(&self) -> &'static [NormSite] {
        self.sites
    }

    fn layer(
        &self,
        x: &mut Matrix,
        norm: &dyn Fn(NormSite, &Matrix) -> Matrix,
        attention: &mut dyn FnMut(&Matrix) -> Matrix,
        ffn: &dyn Fn(&Matrix) -> Matrix,
    ) {
        (self.layer)(x, norm, attention, ffn)
    }
}
