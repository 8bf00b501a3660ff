//! Causal scaled-dot-product attention over a sequence's cached keys and values: each query
//! head materialises its scores, or, with a tile, walks the keys in tiles with an online
//! softmax that holds one tile of scores at a time.

use super::pool;
use crate::backend::math::{axpy, dot, softcap, softmax};
use crate::backend::tensor::Matrix;
use crate::backend::AttentionShape;
use crate::backend::{AttendOptions, KvView};

pub fn attention(
    q: &Matrix,
    kv: &KvView<'_>,
    positions: &[usize],
    shape: &AttentionShape,
    options: AttendOptions<'_>,
) -> Matrix {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
        scale,
        tile,
    } = *shape;
    let kv_dim = kv_heads * hd;
    let group = heads / kv_heads;
    let mut out = Matrix::zeros(q.rows, heads * hd);
    pool::pool().for_each_chunk(&mut out.data, hd, |index, out_head| {
        let (row, head) = (index / heads, index % heads);
        let kv_offset = (head / group) * hd;
        let query = &q.row(row)[head * hd..(head + 1) * hd];
        // A query sees cached tokens up to and including its own position; with a window,
        // only the latest `window` of them.
        let end = (positions[row] + 1).min(kv.tokens);
        let start = options.window.map_or(0, |w| end.saturating_sub(w));
        let slope = options.alibi.map(|slopes| slopes[head]);
        let score = |position: usize, key: &[f32]| {
            let mut score = dot(query, &key[kv_offset..kv_offset + hd]) * scale;
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
        let Some(tile) = tile else {
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
