//! The gated feed-forward kernel shared by `swiglu` and `geglu`:
//! `down(act(gate(x)) · up(x))`; they differ only in the activation.

use std::sync::Arc;

use vibee_core::backend::{Activation, Backend, GateUp as Input};
use vibee_core::model::ops::{BuildContext, Ffn, Linear};
use vibee_core::Matrix;

pub struct GatedFfn {
    gate_up: GateUp,
    down: Box<dyn Linear>,
    act: Activation,
    backend: Arc<dyn Backend>,
}

/// The gate and up projections, stored apart or fused as `[gate; up]` rows.
enum GateUp {
    Separate(Box<dyn Linear>, Box<dyn Linear>),
    Fused(Box<dyn Linear>),
}

impl GatedFfn {
    /// Binds `{prefix}.gate_proj`, `.up_proj` (or the family's fused gate/up) and `.down_proj`
    /// of the config's width.
    pub fn build(cx: &BuildContext<'_>, prefix: &str, act: Activation) -> anyhow::Result<Self> {
        let (hidden, inter) = (cx.config.hidden_size, cx.config.intermediate_size);
        if let Some(fused) = cx.config.layout.gate_up {
            return Ok(Self {
                gate_up: GateUp::Fused(cx.linear(
                    &format!("{prefix}.{fused}.weight"),
                    2 * inter,
                    hidden,
                )?),
                down: cx.linear(&format!("{prefix}.down_proj.weight"), hidden, inter)?,
                act,
                backend: cx.backend.clone(),
            });
        }
        let [gate, up, down] =
            ["gate_proj", "up_proj", "down_proj"].map(|n| format!("{prefix}.{n}.weight"));
        Self::from_names(cx, [&gate, &up, &down], cx.config.intermediate_size, act)
    }

    /// Binds the gate, up and down weights named, `width` wide.
    pub fn from_names(
        cx: &BuildContext<'_>,
        [gate, up, down]: [&str; 3],
        width: usize,
        act: Activation,
    ) -> anyhow::Result<Self> {
        let hidden = cx.config.hidden_size;
        let gate_up = match cx.stacked_linear(&[gate, up], &[width, width], hidden)? {
            // One product gives both halves.
            Some(both) => GateUp::Fused(both),
            None => GateUp::Separate(
                cx.linear(gate, width, hidden)?,
                cx.linear(up, width, hidden)?,
            ),
        };
        Ok(Self {
            gate_up,
            down: cx.linear(down, hidden, width)?,
            act,
            backend: cx.backend.clone(),
        })
    }
}

impl Ffn for GatedFfn {
    fn forward(&self, x: &Matrix) -> Matrix {
        let gated = match &self.gate_up {
            GateUp::Separate(gate, up) => {
                let (gate, up) = (gate.forward(x), up.forward(x));
                self.backend.gated(
                    Input::Separate {
                        gate: &gate,
                        up: &up,
                    },
                    self.act,
                )
            }
            GateUp::Fused(fused) => self
                .backend
                .gated(Input::Halves(&fused.forward(x)), self.act),
        };
        self.down.forward(&gated)
    }

    fn weight_bytes(&self) -> usize {
        let gate_up = match &self.gate_up {
            GateUp::Separate(gate, up) => gate.weight_bytes() + up.weight_bytes(),
            GateUp::Fused(fused) => fused.weight_bytes(),
        };
        gate_up + self.down.weight_bytes()
    }
}
