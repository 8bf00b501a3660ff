//! v2263 `mlp`: the plain two-layer feed-forward `proj(act(fc(x)))`, with biases where the
//! checkpoint has them (StarCoder2's `c_fc`/`c_proj`, GPT-NeoX's and Falcon's
//! `dense_h_to_4h`/`dense_4h_to_h`).

use vibee_core::config::{FfnKind, ModelConfig};
use vibee_core::ops::{BuildContext, Factory, Ffn, Linear};
use vibee_core::Matrix;

use vibee_core::cpu::silu;

/// The activations a plain MLP may use: the GELUs, ReLU (OPT-style) and SiLU.
fn activation(name: &str) -> Option<fn(f32) -> f32> {
    match name {
        "relu" => Some(|x: f32| x.max(0.0)),
        "silu" => Some(silu),
        gelu => super::geglu::activation(gelu),
    }
}

pub struct Mlp;

vibee_core::operator_plugin!(Mlp, "v2263", "mlp", Ffn);

impl Factory<dyn Ffn> for Mlp {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match (config.ffn, activation(&config.hidden_act)) {
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
            act: activation(&cx.config.hidden_act).expect("checked before building"),
        }))
    }
}

struct MlpOp {
    fc: Box<dyn Linear>,
    fc_bias: Option<Vec<f32>>,
    proj: Box<dyn Linear>,
    proj_bias: Option<Vec<f32>>,
    act: fn(f32) -> f32,
}

fn add_bias(x: &mut Matrix, bias: &Option<Vec<f32>>) {
    if let Some(b) = bias {
        for row in x.rows_iter_mut() {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
    }
}

impl Ffn for MlpOp {
    fn forward(&self, x: &Matrix) -> Matrix {
        let mut h = self.fc.forward(x);
        add_bias(&mut h, &self.fc_bias);
        h.data.iter_mut().for_each(|v| *v = (self.act)(*v));
        let mut out = self.proj.forward(&h);
        add_bias(&mut out, &self.proj_bias);
        out
    }

    fn weight_bytes(&self) -> usize {
        self.fc.weight_bytes() + self.proj.weight_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::activation;

    #[test]
    fn activations_by_name() {
        let relu = activation("relu").unwrap();
        assert_eq!((relu(-2.0), relu(3.0)), (0.0, 3.0));
        assert!((activation("silu").unwrap()(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!(activation("gelu_new").is_some() && activation("swish7").is_none());
    }
}
