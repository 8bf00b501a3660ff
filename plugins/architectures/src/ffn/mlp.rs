//! v2263 `mlp`: the plain two-layer feed-forward `proj(act(fc(x)))`, with biases where the
//! checkpoint has them (StarCoder2's `c_fc`/`c_proj`, GPT-NeoX's and Falcon's
//! `dense_h_to_4h`/`dense_4h_to_h`).

use std::sync::Arc;

use vibee_core::backend::{Activation, Backend};
use vibee_core::config::{FfnKind, ModelConfig};
use vibee_core::model::ops::{BuildContext, Factory, Ffn, Linear};
use vibee_core::Matrix;

pub struct Mlp;

vibee_core::operator_plugin!(Mlp, "v2263", "mlp", Ffn);

impl Factory<dyn Ffn> for Mlp {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match (config.ffn, Activation::from_name(&config.hidden_act)) {
            (FfnKind::Plain { .. }, Some(_)) => Ok(()),
            (FfnKind::Plain { .. }, None) => Err(format!(
                "config.json hidden_act = \"{}\" is not supported",
                config.hidden_act
            )),
            (FfnKind::Gated, _) => Err(format!(
                "model_type {} has a gated feed-forward (use `swiglu` or `geglu`)",
                config.model_type
            )),
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Ffn>> {
        let (hidden, inter) = (cx.config.hidden_size, cx.config.intermediate_size);
        let biased = matches!(cx.config.ffn, FfnKind::Plain { bias: true });
        let bias = |name: &str, len| {
            biased
                .then(|| cx.vector(&format!("{prefix}.{name}.bias"), len))
                .transpose()
        };
        let (fc, proj) = (cx.config.layout.mlp_in, cx.config.layout.mlp_out);
        Ok(Box::new(MlpOp {
            fc: cx.linear(&format!("{prefix}.{fc}.weight"), inter, hidden)?,
            fc_bias: bias(fc, inter)?,
            proj: cx.linear(&format!("{prefix}.{proj}.weight"), hidden, inter)?,
            proj_bias: bias(proj, hidden)?,
            act: Activation::from_name(&cx.config.hidden_act).expect("checked before building"),
            backend: cx.backend.clone(),
        }))
    }
}

struct MlpOp {
    fc: Box<dyn Linear>,
    fc_bias: Option<Vec<f32>>,
    proj: Box<dyn Linear>,
    proj_bias: Option<Vec<f32>>,
    act: Activation,
    backend: Arc<dyn Backend>,
}

impl Ffn for MlpOp {
    fn forward(&self, x: &Matrix) -> Matrix {
        let backend = &self.backend;
        let mut h = self.fc.forward(x);
        if let Some(bias) = &self.fc_bias {
            backend.add_row(&mut h, bias);
        }
        backend.activation(&mut h, self.act);
        let mut out = self.proj.forward(&h);
        if let Some(bias) = &self.proj_bias {
            backend.add_row(&mut out, bias);
        }
        out
    }

    fn weight_bytes(&self) -> usize {
        self.fc.weight_bytes() + self.proj.weight_bytes()
    }
}
