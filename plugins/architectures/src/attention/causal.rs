//! The causal scaled-dot-product attention kernel shared by `mha`, `mqa` and `gqa`: they differ
//! only in how many query heads share one key/value head.

use vibee_core::config::ModelConfig;
use vibee_core::cpu::{axpy, dot, softmax};
use vibee_core::ops::{Attention, KvView};
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
            scale: 1.0 / (config.head_dim as f32).sqrt(),
        }
    }
}

impl Attention for CausalAttention {
    fn forward(&self, q: &Matrix, kv: &KvView<'_>, positions: &[usize]) -> Matrix {
        let (hd, kv_dim) = (self.head_dim, self.kv_heads * self.head_dim);
        let group = self.heads / self.kv_heads;
        let mut out = Matrix::zeros(q.rows, self.heads * hd);
        parallel::pool().for_each_chunk(&mut out.data, hd, |index, out_head| {
            let (row, head) = (index / self.heads, index % self.heads);
            let kv_offset = (head / group) * hd;
            let query = &q.row(row)[head * hd..(head + 1) * hd];
            // A query sees every cached token up to and including its own position.
            let visible = (positions[row] + 1).min(kv.tokens);
            let mut scores = Vec::with_capacity(visible);
            for chunk in &kv.keys {
                for key in chunk.chunks_exact(kv_dim) {
                    if scores.len() == visible {
                        break;
                    }
                    scores.push(dot(query, &key[kv_offset..kv_offset + hd]) * self.scale);
                }
            }
            softmax(&mut scores);
            let mut weights = scores.iter();
            for chunk in &kv.values {
                for (value, w) in chunk.chunks_exact(kv_dim).zip(weights.by_ref()) {
                    axpy(*w, &value[kv_offset..kv_offset + hd], out_head);
                }
            }
        });
        out
    }
}
