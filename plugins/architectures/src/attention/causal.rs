//! The causal scaled-dot-product attention kernel shared by `mha`, `mqa` and `gqa`: they differ
//! only in how many query heads share one key/value head.

use vibee_core::config::ModelConfig;
use vibee_core::cpu::{axpy, dot, softcap, softmax};
use vibee_core::ops::{AttendOptions, Attention, KvView};
use vibee_core::parallel;
use vibee_core::Matrix;

pub struct CausalAttention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
}

impl CausalAttention {
    pub fn new(config: &ModelConfig) -> Self {
        Self {
            heads: config.num_heads,
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            // Gemma 2 scales queries by its own `query_pre_attn_scalar` rather than head_dim.
            scale: 1.0
                / config
                    .query_pre_attn_scalar
                    .unwrap_or(config.head_dim as f64)
                    .sqrt() as f32,
        }
    }
}

impl Attention for CausalAttention {
    fn forward(
        &self,
        q: &Matrix,
        kv: &KvView<'_>,
        positions: &[usize],
        options: AttendOptions<'_>,
    ) -> Matrix {
        let (hd, kv_dim) = (self.head_dim, self.kv_heads * self.head_dim);
        let group = self.heads / self.kv_heads;
        let mut out = Matrix::zeros(q.rows, self.heads * hd);
        parallel::pool().for_each_chunk(&mut out.data, hd, |index, out_head| {
            let (row, head) = (index / self.heads, index % self.heads);
            let kv_offset = (head / group) * hd;
            let query = &q.row(row)[head * hd..(head + 1) * hd];
            // A query sees cached tokens up to and including its own position; with a window,
            // only the latest `window` of them.
            let end = (positions[row] + 1).min(kv.tokens);
            let start = options.window.map_or(0, |w| end.saturating_sub(w));
            let keys = kv.keys.iter().flat_map(|chunk| chunk.chunks_exact(kv_dim));
            let slope = options.alibi.map(|slopes| slopes[head]);
            let mut scores: Vec<f32> = keys
                .enumerate()
                .take(end)
                .skip(start)
                .map(|(position, key)| {
                    let mut score = dot(query, &key[kv_offset..kv_offset + hd]) * self.scale;
                    if let Some(slope) = slope {
                        score += slope * position as f32;
                    }
                    options.softcap.map_or(score, |cap| softcap(score, cap))
                })
                .collect();
            softmax(&mut scores);
            let values = kv
                .values
                .iter()
                .flat_map(|chunk| chunk.chunks_exact(kv_dim));
            for (value, w) in values.skip(start).zip(&scores) {
                axpy(*w, &value[kv_offset..kv_offset + hd], out_head);
            }
        });
        out
    }
}
