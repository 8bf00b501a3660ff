//! v2204 `mla`: multi-head latent attention (DeepSeek-V2/V3). Keys and values are compressed to
//! one `kv_lora_rank` latent per token plus a small rotary key shared by all heads; that pair is
//! all the KV cache holds. Queries go through an optional low-rank bottleneck and split into a
//! position-free part and a rotary part.
//!
//! Attention runs in the absorbed form: each head's key up-projection is folded into its query
//! (`q_nope · (W_k c) = (W_kᵀ q_nope) · c`) and its value up-projection applied after the
//! weighted sum of latents, so no per-head key or value is ever materialised — the decode path
//! reads the compressed cache directly.

use std::sync::Arc;

use vibee_core::backend::kv::KvShape;
use vibee_core::backend::math::{axpy, dot, softmax};
use vibee_core::backend::Backend;
use vibee_core::config::{MlaConfig, ModelConfig, RopeScaling};
use vibee_core::model::ops::{
    AttentionBlock, BuildContext, Factory, Linear, Norm, PositionEncoding, SequenceKv,
};
use vibee_core::Matrix;

use crate::norm::rmsnorm::RmsNormOp;

pub struct Mla;

vibee_core::operator_plugin!(Mla, "v2204", "mla", AttentionBlock);

impl Factory<dyn AttentionBlock> for Mla {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match config.mla {
            Some(_) => Ok(()),
            None => Err(format!(
                "model_type {} has no latent attention (no kv_lora_rank)",
                config.model_type
            )),
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn AttentionBlock>> {
        let config = cx.config;
        let m = config.mla.expect("checked before building");
        let (hidden, heads) = (config.hidden_size, config.num_heads);
        let qk = m.nope_dim + m.rope_dim;
        let query = match m.q_lora_rank {
            None => {
                Query::Direct(cx.linear(&format!("{prefix}.q_proj.weight"), heads * qk, hidden)?)
            }
            Some(rank) => Query::LowRank {
                down: cx.linear(&format!("{prefix}.q_a_proj.weight"), rank, hidden)?,
                norm: RmsNormOp::load(cx, &format!("{prefix}.q_a_layernorm"), rank, 0.0)?,
                up: cx.linear(&format!("{prefix}.q_b_proj.weight"), heads * qk, rank)?,
            },
        };
        let kv_up = cx.weight(
            &format!("{prefix}.kv_b_proj.weight"),
            &[heads * (m.nope_dim + m.v_dim), m.kv_lora_rank],
        )?;
        // DeepSeek's YaRN also sharpens the softmax by mscale² (transformers' yarn_apply_mscale).
        let mscale = match config.rope_scaling {
            RopeScaling::Yarn { softmax_mscale, .. } => softmax_mscale as f32,
            _ => 1.0,
        };
        Ok(Box::new(LatentAttention {
            m,
            heads,
            query,
            kv_down: cx.linear(
                &format!("{prefix}.kv_a_proj_with_mqa.weight"),
                m.kv_lora_rank + m.rope_dim,
                hidden,
            )?,
            kv_norm: RmsNormOp::load(cx, &format!("{prefix}.kv_a_layernorm"), m.kv_lora_rank, 0.0)?,
            kv_up_bytes: kv_up.bytes(),
            kv_up: kv_up.to_f32_vec(),
            o_proj: cx.linear(&format!("{prefix}.o_proj.weight"), hidden, heads * m.v_dim)?,
            scale: mscale * mscale / (qk as f32).sqrt(),
            backend: cx.backend.clone(),
        }))
    }
}

enum Query {
    Direct(Box<dyn Linear>),
    LowRank {
        down: Box<dyn Linear>,
        norm: RmsNormOp,
        up: Box<dyn Linear>,
    },
}

struct LatentAttention {
    m: MlaConfig,
    heads: usize,
    query: Query,
    kv_down: Box<dyn Linear>,
    kv_norm: RmsNormOp,
    /// `kv_b_proj` as f32 rows: per head, `nope_dim` key rows then `v_dim` value rows, each of
    /// `kv_lora_rank` columns.
    kv_up: Vec<f32>,
    kv_up_bytes: usize,
    o_proj: Box<dyn Linear>,
    scale: f32,
    backend: Arc<dyn Backend>,
}

impl LatentAttention {
    /// Rows `first..first + count` of the key/value up-projection.
    fn up_rows(&self, first: usize, count: usize) -> std::slice::ChunksExact<'_, f32> {
        let rank = self.m.kv_lora_rank;
        self.kv_up[first * rank..(first + count) * rank].chunks_exact(rank)
    }
}

impl AttentionBlock for LatentAttention {
    fn forward(
        &self,
        h: &Matrix,
        kv: &mut dyn SequenceKv,
        layer: usize,
        positions: &[usize],
        position: &dyn PositionEncoding,
    ) -> Matrix {
        let MlaConfig {
            kv_lora_rank: rank,
            nope_dim: nope,
            rope_dim: rope,
            v_dim,
            ..
        } = self.m;
        let (heads, n, qk) = (self.heads, h.rows, nope + rope);
        let q = match &self.query {
            Query::Direct(proj) => proj.forward(h),
            Query::LowRank { down, norm, up } => up.forward(&norm.forward(&down.forward(h))),
        };
        // The rotary parts of every head's query, and the shared rotary key, get positions.
        let mut q_rope = Matrix::zeros(n, heads * rope);
        for i in 0..n {
            for head in 0..heads {
                q_rope.row_mut(i)[head * rope..(head + 1) * rope]
                    .copy_from_slice(&q.row(i)[head * qk + nope..(head + 1) * qk]);
            }
        }
        position.apply(&mut q_rope, heads, positions);
        let compressed = self.kv_down.forward(h);
        let mut latent = Matrix::zeros(n, rank);
        let mut k_rope = Matrix::zeros(n, rope);
        for i in 0..n {
            latent
                .row_mut(i)
                .copy_from_slice(&compressed.row(i)[..rank]);
            k_rope
                .row_mut(i)
                .copy_from_slice(&compressed.row(i)[rank..]);
        }
        let latent = self.kv_norm.forward(&latent);
        position.apply(&mut k_rope, 1, positions);
        let mut cached = Matrix::zeros(n, rank + rope);
        for i in 0..n {
            cached.row_mut(i)[..rank].copy_from_slice(latent.row(i));
            cached.row_mut(i)[rank..].copy_from_slice(k_rope.row(i));
        }
        kv.append(layer, &cached, &Matrix::zeros(n, 0));
        let view = kv.view(layer);
        // One latent group per token: a quantized cache is widened once, not once per head.
        let latents: Vec<_> = view
            .keys
            .iter()
            .map(|chunk| {
                chunk.to_f32(KvShape {
                    heads: 1,
                    head_dim: rank + rope,
                })
            })
            .collect();
        let mut out = Matrix::zeros(n, heads * v_dim);
        let absorbed = |index: usize, out_head: &mut [f32]| {
            let (row, head) = (index / heads, index % heads);
            let q_nope = &q.row(row)[head * qk..head * qk + nope];
            let q_pe = &q_rope.row(row)[head * rope..(head + 1) * rope];
            // Absorb the head's key up-projection into its query: a query in latent space.
            let mut q_latent = vec![0.0; rank];
            for (w_row, qv) in self.up_rows(head * (nope + v_dim), nope).zip(q_nope) {
                axpy(*qv, w_row, &mut q_latent);
            }
            let visible = (positions[row] + 1).min(view.tokens);
            let tokens = latents
                .iter()
                .flat_map(|chunk| chunk.chunks_exact(rank + rope))
                .take(visible);
            let mut scores: Vec<f32> = tokens
                .clone()
                .map(|t| (dot(&q_latent, &t[..rank]) + dot(q_pe, &t[rank..])) * self.scale)
                .collect();
            softmax(&mut scores);
            let mut mixed = vec![0.0; rank];
            for (t, w) in tokens.zip(&scores) {
                axpy(*w, &t[..rank], &mut mixed);
            }
            for (o, w_row) in out_head
                .iter_mut()
                .zip(self.up_rows(head * (nope + v_dim) + nope, v_dim))
            {
                *o = dot(w_row, &mixed);
            }
        };
        self.backend
            .custom("mla-absorbed-attention", &mut out, v_dim, &absorbed);
        self.o_proj.forward(&out)
    }

    fn weight_bytes(&self) -> usize {
        let query = match &self.query {
            Query::Direct(proj) => proj.weight_bytes(),
            Query::LowRank { down, up, .. } => down.weight_bytes() + up.weight_bytes(),
        };
        query + self.kv_down.weight_bytes() + self.kv_up_bytes + self.o_proj.weight_bytes()
    }
}
