//! v2262 `moe`: mixture-of-experts feed-forward. A router scores the experts per token; each
//! token goes through its top-k SwiGLU experts (softmax then top-k — within the best expert
//! groups for DeepSeek's group-limited routing —, renormalised or scaled as the checkpoint
//! says), plus shared experts where the family has them (Qwen2-MoE's behind a sigmoid gate,
//! DeepSeek's ungated).
//!
//! Tokens are gathered per expert and each expert runs once on its batch of rows, so a prefill
//! costs one matmul per expert, not one per token, and the layout splits across devices by
//! expert.

use std::sync::Arc;

use vibee_core::backend::{Activation, Backend};
use vibee_core::config::{ModelConfig, MoeConfig};
use vibee_core::model::ops::{BuildContext, Factory, Ffn, Linear};
use vibee_core::Matrix;

use super::gated::GatedFfn;

pub struct Moe;

vibee_core::operator_plugin!(Moe, "v2262", "moe", Ffn);

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
            return Ok(Box::new(GatedFfn::build(cx, prefix, Activation::Silu)?));
        }
        Ok(Box::new(build_experts(cx, moe)?))
    }
}

fn build_experts(cx: &BuildContext<'_>, moe: &MoeConfig) -> anyhow::Result<MoeOp> {
    let layer = format!("{}.{}", cx.config.layout.layers, cx.layer);
    let hidden = cx.config.hidden_size;
    let block = format!("{layer}.{}", moe.layout.block());
    let [gate, up, down] = moe.layout.expert_projections();
    let shared_name = moe.layout.shared_expert();
    let experts = (0..moe.experts)
        .map(|e| {
            let [g, u, d] = [gate, up, down].map(|n| format!("{block}.experts.{e}.{n}.weight"));
            GatedFfn::from_names(cx, [&g, &u, &d], moe.expert_intermediate, Activation::Silu)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shared = match moe.shared_intermediate {
        Some(width) => {
            let [g, u, d] = ["gate_proj", "up_proj", "down_proj"]
                .map(|n| format!("{block}.{shared_name}.{n}.weight"));
            let gate = moe
                .shared_gate
                .then(|| cx.linear(&format!("{block}.shared_expert_gate.weight"), 1, hidden))
                .transpose()?;
            Some((
                GatedFfn::from_names(cx, [&g, &u, &d], width, Activation::Silu)?,
                gate,
            ))
        }
        None => None,
    };
    Ok(MoeOp {
        router: cx.linear(&format!("{block}.gate.weight"), moe.experts, hidden)?,
        experts,
        top_k: moe.top_k,
        normalize: moe.normalize_top_k,
        scale: moe.routed_scale,
        group_limit: moe.group_limit,
        shared,
        backend: cx.backend.clone(),
    })
}

struct MoeOp {
    router: Box<dyn Linear>,
    experts: Vec<GatedFfn>,
    top_k: usize,
    normalize: bool,
    scale: f32,
    group_limit: Option<(usize, usize)>,
    /// The shared expert, and its sigmoid gate where the family has one.
    shared: Option<(GatedFfn, Option<Box<dyn Linear>>)>,
    backend: Arc<dyn Backend>,
}

impl MoeOp {
    /// For each expert, the tokens routed to it and their routing weights.
    fn route(&self, x: &Matrix) -> Vec<Vec<(usize, f32)>> {
        let mut probs = self.router.forward(x);
        self.backend.softmax_rows(&mut probs);
        let mut assigned = vec![Vec::new(); self.experts.len()];
        for (token, probs) in probs.rows_iter_mut().enumerate() {
            if let Some((groups, top_groups)) = self.group_limit {
                restrict_to_best_groups(probs, groups, top_groups);
            }
            let chosen = self.backend.top_k(probs, self.top_k);
            let total: f32 = if self.normalize {
                chosen.iter().map(|&e| probs[e]).sum()
            } else {
                1.0
            };
            for e in chosen {
                assigned[e].push((token, probs[e] / total * self.scale));
            }
        }
        assigned
    }
}

/// Zeroes the probabilities outside the `top_groups` groups whose best expert scores highest.
fn restrict_to_best_groups(probs: &mut [f32], groups: usize, top_groups: usize) {
    let size = probs.len() / groups;
    let best: Vec<f32> = probs
        .chunks(size)
        .map(|g| g.iter().copied().fold(f32::MIN, f32::max))
        .collect();
    let mut order: Vec<usize> = (0..groups).collect();
    order.sort_by(|&a, &b| best[b].total_cmp(&best[a]).then(a.cmp(&b)));
    for &g in &order[top_groups..] {
        probs[g * size..(g + 1) * size].fill(0.0);
    }
}

impl Ffn for MoeOp {
    fn forward(&self, x: &Matrix) -> Matrix {
        let backend = &self.backend;
        let mut out = Matrix::zeros(x.rows, x.cols);
        for (expert, routed) in self.experts.iter().zip(self.route(x)) {
            if routed.is_empty() {
                continue;
            }
            let (tokens, weights): (Vec<usize>, Vec<f32>) = routed.into_iter().unzip();
            let y = expert.forward(&backend.gather_rows(x, &tokens));
            backend.scatter_add_rows(&mut out, &tokens, &y, &weights);
        }
        if let Some((shared, gate)) = &self.shared {
            let y = shared.forward(x);
            let scales: Vec<f32> = match gate {
                Some(gate) => gate
                    .forward(x)
                    .data
                    .iter()
                    .map(|g| 1.0 / (1.0 + (-g).exp()))
                    .collect(),
                None => vec![1.0; x.rows],
            };
            let every: Vec<usize> = (0..x.rows).collect();
            backend.scatter_add_rows(&mut out, &every, &y, &scales);
        }
        out
    }

    /// A decode token reads the router, its top-k experts and the shared expert.
    fn weight_bytes(&self) -> usize {
        let expert = self.experts.first().map_or(0, Ffn::weight_bytes);
        let shared = self.shared.as_ref().map_or(0, |(s, g)| {
            s.weight_bytes() + g.as_ref().map_or(0, |g| g.weight_bytes())
        });
        self.router.weight_bytes() + self.top_k * expert + shared
    }
}

#[cfg(test)]
mod tests {
    use super::restrict_to_best_groups;

    #[test]
    fn group_limited_routing_keeps_only_the_best_groups() {
        // 3 groups of 2 experts; group maxima 0.30, 0.25, 0.20: the best two groups survive,
        // as transformers' group_limited_greedy masks them (its scores.masked_fill(~mask, 0)).
        let mut probs = [0.30, 0.05, 0.25, 0.10, 0.20, 0.10];
        restrict_to_best_groups(&mut probs, 3, 2);
        assert_eq!(probs, [0.30, 0.05, 0.25, 0.10, 0.0, 0.0]);
    }
}
