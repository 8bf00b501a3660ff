//! v2262 `moe`: mixture-of-experts feed-forward. A router scores the experts per token; each
//! token goes through its top-k SwiGLU experts (softmax then top-k, renormalised or not as the
//! checkpoint says), plus a sigmoid-gated shared expert where the family has one (Qwen2-MoE).
//!
//! Tokens are gathered per expert and each expert runs once on its batch of rows, so a prefill
//! costs one matmul per expert, not one per token, and the layout splits across devices by
//! expert.

use std::sync::Arc;

use vibee_core::config::{ModelConfig, MoeConfig, MoeLayout};
use vibee_core::cpu::{axpy, silu, softmax};
use vibee_core::ops::{BuildContext, Factory, Ffn, Linear, Operator};
use vibee_core::{App, Matrix, Plugin, PluginSpec};

use super::gated::GatedFfn;

pub struct Moe;

impl Plugin for Moe {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2262",
            name: "moe",
        }
    }

    fn build(&self, app: &mut App) {
        app.register_operator(Operator::Ffn(Arc::new(Moe)));
    }
}

impl Factory<dyn Ffn> for Moe {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match (&config.moe, config.hidden_act.as_str()) {
            (Some(_), "silu") => Ok(()),
            (Some(_), act) => Err(format!(
                "config.json hidden_act = \"{act}\" but the experts are SwiGLU (silu)"
            )),
            (None, _) => Err(format!("model_type {} has no experts", config.model_type)),
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Ffn>> {
        let moe = cx.config.moe.as_ref().expect("checked before building");
        if !moe.sparse_layers[cx.layer] {
            return Ok(Box::new(GatedFfn::build(cx, prefix, silu)?));
        }
        Ok(Box::new(build_experts(cx, moe)?))
    }
}

fn build_experts(cx: &BuildContext<'_>, moe: &MoeConfig) -> anyhow::Result<MoeOp> {
    let layer = format!("{}.{}", cx.config.layout.layers, cx.layer);
    let hidden = cx.config.hidden_size;
    let (block, [gate, up, down]) = match moe.layout {
        MoeLayout::Mixtral => (format!("{layer}.block_sparse_moe"), ["w1", "w3", "w2"]),
        MoeLayout::Qwen => (
            format!("{layer}.mlp"),
            ["gate_proj", "up_proj", "down_proj"],
        ),
    };
    let experts = (0..moe.experts)
        .map(|e| {
            let [g, u, d] = [gate, up, down].map(|n| format!("{block}.experts.{e}.{n}.weight"));
            GatedFfn::from_names(cx, [&g, &u, &d], moe.expert_intermediate, silu)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shared = match moe.shared_intermediate {
        Some(width) => {
            let [g, u, d] = ["gate_proj", "up_proj", "down_proj"]
                .map(|n| format!("{block}.shared_expert.{n}.weight"));
            Some((
                GatedFfn::from_names(cx, [&g, &u, &d], width, silu)?,
                cx.linear(&format!("{block}.shared_expert_gate.weight"), 1, hidden)?,
            ))
        }
        None => None,
    };
    Ok(MoeOp {
        router: cx.linear(&format!("{block}.gate.weight"), moe.experts, hidden)?,
        experts,
        top_k: moe.top_k,
        normalize: moe.normalize_top_k,
        shared,
    })
}

struct MoeOp {
    router: Box<dyn Linear>,
    experts: Vec<GatedFfn>,
    top_k: usize,
    normalize: bool,
    shared: Option<(GatedFfn, Box<dyn Linear>)>,
}

impl MoeOp {
    /// For each expert, the tokens routed to it and their routing weights.
    fn route(&self, x: &Matrix) -> Vec<Vec<(usize, f32)>> {
        let mut logits = self.router.forward(x);
        let mut assigned = vec![Vec::new(); self.experts.len()];
        for (token, probs) in logits.rows_iter_mut().enumerate() {
            softmax(probs);
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let chosen = &order[..self.top_k];
            let total: f32 = if self.normalize {
                chosen.iter().map(|&e| probs[e]).sum()
            } else {
                1.0
            };
            for &e in chosen {
                assigned[e].push((token, probs[e] / total));
            }
        }
        assigned
    }
}

impl Ffn for MoeOp {
    fn forward(&self, x: &Matrix) -> Matrix {
        let mut out = Matrix::zeros(x.rows, x.cols);
        for (expert, tokens) in self.experts.iter().zip(self.route(x)) {
            if tokens.is_empty() {
                continue;
            }
            let mut batch = Matrix::zeros(tokens.len(), x.cols);
            for (row, (token, _)) in batch.rows_iter_mut().zip(&tokens) {
                row.copy_from_slice(x.row(*token));
            }
            let y = expert.forward(&batch);
            for (row, (token, weight)) in y.rows_iter().zip(&tokens) {
                axpy(*weight, row, out.row_mut(*token));
            }
        }
        if let Some((shared, gate)) = &self.shared {
            let y = shared.forward(x);
            let g = gate.forward(x);
            for (token, row) in y.rows_iter().enumerate() {
                let scale = 1.0 / (1.0 + (-g.data[token]).exp());
                axpy(scale, row, out.row_mut(token));
            }
        }
        out
    }

    /// A decode token reads the router, its top-k experts and the shared expert.
    fn weight_bytes(&self) -> usize {
        let expert = self.experts.first().map_or(0, Ffn::weight_bytes);
        let shared = self
            .shared
            .as_ref()
            .map_or(0, |(s, g)| s.weight_bytes() + g.weight_bytes());
        self.router.weight_bytes() + self.top_k * expert + shared
    }
}
