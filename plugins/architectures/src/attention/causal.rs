//! The causal scaled-dot-product attention kernel shared by `mha`, `mqa`, `gqa` and
//! `flash-attention`. The first three differ only in how many query heads share one key/value
//! head and materialise each query's scores; `flash-attention` walks the keys in tiles with an
//! online softmax instead, holding one tile of scores at a time.

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
    /// Keys per tile of the online softmax; `None` scores all keys at once.
    tile: Option<usize>,
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
            tile: None,
        }
    }

    /// The tiled, online-softmax variant: never holds more than `tile` scores per query.
    pub fn tiled(self, tile: usize) -> Self {
        Self {
            tile: Some(tile.max(1)),
            ..self
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
            let slope = options.alibi.map(|slopes| slopes[head]);
            let score = |position: usize, key: &[f32]| {
                let mut score = dot(query, &key[kv_offset..kv_offset + hd]) * self.scale;
                if let Some(slope) = slope {
                    score += slope * position as f32;
                }
                options.softcap.map_or(score, |cap| softcap(score, cap))
            };
            let keys = kv.keys.iter().flat_map(|chunk| chunk.chunks_exact(kv_dim));
            let values = kv
                .values
                .iter()
                .flat_map(|chunk| chunk.chunks_exact(kv_dim));
            let visible = keys.zip(values).enumerate().take(end).skip(start);
            let Some(tile) = self.tile else {
                let (mut scores, values): (Vec<f32>, Vec<&[f32]>) = visible
                    .map(|(p, (key, value))| (score(p, key), value))
                    .unzip();
                softmax(&mut scores);
                for (value, w) in values.iter().zip(&scores) {
                    axpy(*w, &value[kv_offset..kv_offset + hd], out_head);
                }
                return;
            };
            // Online softmax: keep the running maximum and the sum of exponentials, and rescale
            // what was accumulated whenever the maximum grows.
            let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
            let mut scores = Vec::with_capacity(tile);
            let mut tile_values = Vec::with_capacity(tile);
            let mut visible = visible.peekable();
            while visible.peek().is_some() {
                scores.clear();
                tile_values.clear();
                for (p, (key, value)) in visible.by_ref().take(tile) {
                    scores.push(score(p, key));
                    tile_values.push(value);
                }
                let tile_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let new_max = max.max(tile_max);
                let correction = (max - new_max).exp();
                sum *= correction;
                out_head.iter_mut().for_each(|o| *o *= correction);
                for (s, value) in scores.iter().zip(&tile_values) {
                    let w = (s - new_max).exp();
                    sum += w;
                    axpy(w, &value[kv_offset..kv_offset + hd], out_head);
                }
                max = new_max;
            }
            let inv = 1.0 / sum;
            out_head.iter_mut().for_each(|o| *o *= inv);
        });
        out
    }
}
