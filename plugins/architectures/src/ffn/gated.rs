//! The gated feed-forward kernel shared by `swiglu` and `geglu`:
//! `down(act(gate(x)) · up(x))`; they differ only in the activation.

use vibee_core::ops::{BuildContext, Ffn, Linear};
use vibee_core::Matrix;

pub struct GatedFfn {
    gate: Box<dyn Linear>,
    up: Box<dyn Linear>,
    down: Box<dyn Linear>,
    act: fn(f32) -> f32,
}

impl GatedFfn {
    /// Binds `{prefix}.gate_proj`, `.up_proj` and `.down_proj` of the config's width.
    pub fn build(cx: &BuildContext<'_>, prefix: &str, act: fn(f32) -> f32) -> anyhow::Result<Self> {
        let [gate, up, down] =
            ["gate_proj", "up_proj", "down_proj"].map(|n| format!("{prefix}.{n}.weight"));
        Self::from_names(cx, [&gate, &up, &down], cx.config.intermediate_size, act)
    }

    /// Binds the gate, up and down weights named, `width` wide.
    pub fn from_names(
        cx: &BuildContext<'_>,
        [gate, up, down]: [&str; 3],
        width: usize,
        act: fn(f32) -> f32,
    ) -> anyhow::Result<Self> {
        let hidden = cx.config.hidden_size;
        Ok(Self {
            gate: cx.linear(gate, width, hidden)?,
            up: cx.linear(up, width, hidden)?,
            down: cx.linear(down, hidden, width)?,
            act,
        })
    }
}

impl Ffn for GatedFfn {
    fn forward(&self, x: &Matrix) -> Matrix {
        let mut gated = self.gate.forward(x);
        let up = self.up.forward(x);
        for (g, u) in gated.data.iter_mut().zip(&up.data) {
            *g = (self.act)(*g) * u;
        }
        self.down.forward(&gated)
    }

    fn weight_bytes(&self) -> usize {
        self.gate.weight_bytes() + self.up.weight_bytes() + self.down.weight_bytes()
    }
}
