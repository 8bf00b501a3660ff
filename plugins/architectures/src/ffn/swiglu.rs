//! v2260 `swiglu`: the gated SiLU feed-forward, `down(silu(gate(x)) · up(x))`.

use std::sync::Arc;

use vibee_core::config::ModelConfig;
use vibee_core::cpu::silu;
use vibee_core::ops::{BuildContext, Factory, Ffn, Linear, Operator};
use vibee_core::{App, Matrix, Plugin, PluginSpec};

pub struct SwiGlu;

impl Plugin for SwiGlu {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2260",
            name: "swiglu",
        }
    }

    fn build(&self, app: &mut App) {
        app.register_operator(Operator::Ffn(Arc::new(SwiGlu)));
    }
}

impl Factory<dyn Ffn> for SwiGlu {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        if config.hidden_act == "silu" {
            Ok(())
        } else {
            Err(format!(
                "config.json hidden_act = \"{}\" but swiglu needs \"silu\"",
                config.hidden_act
            ))
        }
    }

    fn build(&self, cx: &BuildContext<'_>, prefix: &str) -> anyhow::Result<Box<dyn Ffn>> {
        let (hidden, inter) = (cx.config.hidden_size, cx.config.intermediate_size);
        Ok(Box::new(SwiGluOp {
            gate: cx.linear(&format!("{prefix}.gate_proj.weight"), inter, hidden)?,
            up: cx.linear(&format!("{prefix}.up_proj.weight"), inter, hidden)?,
            down: cx.linear(&format!("{prefix}.down_proj.weight"), hidden, inter)?,
        }))
    }
}

struct SwiGluOp {
    gate: Box<dyn Linear>,
    up: Box<dyn Linear>,
    down: Box<dyn Linear>,
}

impl Ffn for SwiGluOp {
    fn forward(&self, x: &Matrix) -> Matrix {
        let mut gated = self.gate.forward(x);
        let up = self.up.forward(x);
        for (g, u) in gated.data.iter_mut().zip(&up.data) {
            *g = silu(*g) * u;
        }
        self.down.forward(&gated)
    }

    fn weight_bytes(&self) -> usize {
        self.gate.weight_bytes() + self.up.weight_bytes() + self.down.weight_bytes()
    }
}
