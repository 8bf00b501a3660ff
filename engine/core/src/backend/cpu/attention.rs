//! Causal scaled-dot-product attention over a sequence's cached keys and values: each query
//! head materialises its scores, or, with a tile, walks the keys in tiles with an online
//! softmax that holds one tile of scores at a time.

use super::pool;
use crate::backend::math::{softcap, softmax};
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
    let mut out = Matrix::zeros(q.rows, shape.heads * shape.head_dim);
    #[cfg(target_arch = "x86_64")]
    let (avx512, avx2) = (
        std::is_x86_feature_detected!("avx512f"),
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
    );
    pool::pool().for_each_chunk(&mut out.data, shape.head_dim, |index, out_head| {
        let head = Head {
            q,
            kv,
            positions,
            shape,
            options,
            index,
        };
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY (both): the features were detected above.
            if avx512 {
                return unsafe { head_avx512(&head, out_head) };
            }
            if avx2 {
                return unsafe { head_avx2(&head, out_head) };
            }
        }
        head_body::<false, 16>(&head, out_head);
    });
    out
}

/// One query head's share of [`attention`]: output chunk `index` (row `index / heads`).
struct Head<'a, 'k> {
    q: &'a Matrix,
    kv: &'a KvView<'k>,
    positions: &'a [usize],
    shape: &'a AttentionShape,
    options: AttendOptions<'a>,
    index: usize,
}

/// [`head_body`] compiled for AVX-512: its dot products and sums run 16 lanes wide, with the
/// lanes of `math::dot` there.
///
/// # Safety
/// AVX-512F must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn head_avx512(head: &Head<'_, '_>, out_head: &mut [f32]) {
    head_body::<true, 32>(head, out_head);
}

/// [`head_body`] compiled for AVX2 and FMA.
///
/// # Safety
/// AVX2 and FMA must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2(head: &Head<'_, '_>, out_head: &mut [f32]) {
    head_body::<true, 32>(head, out_head);
}

/// `LANES`-wide accumulators, fused multiply-adds where `FMA` (only fast where the target
/// has them). Plain loops and `inline(always)` helpers only: a closure that is not inlined is
/// compiled without the caller's target features, and its `mul_add` becomes a libm call.
#[inline(always)]
fn head_body<const FMA: bool, const LANES: usize>(h: &Head<'_, '_>, out_head: &mut [f32]) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
        scale,
        tile,
    } = *h.shape;
    let kv_dim = kv_heads * hd;
    let (row, head) = (h.index / heads, h.index % heads);
    let offset = (head / (heads / kv_heads)) * hd;
    let query = &h.q.row(row)[head * hd..(head + 1) * hd];
    // A query sees cached tokens up to and including its own position; with a window,
    // only the latest `window` of them.
    let end = (h.positions[row] + 1).min(h.kv.tokens);
    let start = h.options.window.map_or(0, |w| end.saturating_sub(w));
    let scores_of = Scores {
        query,
        scale,
        slope: h.options.alibi.map(|slopes| slopes[head]),
        softcap: h.options.softcap,
    };
    let mut visible: Vec<(&[f32], &[f32])> = Vec::with_capacity(end - start);
    let mut position = 0;
    'chunks: for (keys, values) in h.kv.keys.iter().zip(&h.kv.values) {
        for (key, value) in keys.chunks_exact(kv_dim).zip(values.chunks_exact(kv_dim)) {
            if position >= end {
                break 'chunks;
            }
            if position >= start {
                visible.push((&key[offset..offset + hd], &value[offset..offset + hd]));
            }
            position += 1;
        }
    }
    let Some(tile) = tile else {
        let mut scores = Vec::with_capacity(visible.len());
        for (i, (key, _)) in visible.iter().enumerate() {
            scores.push(scores_of.score::<FMA, LANES>(start + i, key));
        }
        softmax(&mut scores);
        for ((_, value), w) in visible.iter().zip(&scores) {
            axpy(*w, value, out_head);
        }
        return;
    };
    // Online softmax: keep the running maximum and the sum of exponentials, and rescale
    // what was accumulated whenever the maximum grows.
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
    let mut scores = Vec::with_capacity(tile);
    for (t, pairs) in visible.chunks(tile).enumerate() {
        scores.clear();
        for (i, (key, _)) in pairs.iter().enumerate() {
            scores.push(scores_of.score::<FMA, LANES>(start + t * tile + i, key));
        }
        let tile_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let new_max = max.max(tile_max);
        let correction = (max - new_max).exp();
        sum *= correction;
        for o in out_head.iter_mut() {
            *o *= correction;
        }
        for (s, (_, value)) in scores.iter().zip(pairs) {
            let w = (s - new_max).exp();
            sum += w;
            axpy(w, value, out_head);
        }
        max = new_max;
    }
    let inv = 1.0 / sum;
    for o in out_head.iter_mut() {
        *o *= inv;
    }
}

/// What one query head's score of a key takes.
struct Scores<'a> {
    query: &'a [f32],
    scale: f32,
    /// ALiBi: the score gains `slope · key position`.
    slope: Option<f32>,
    softcap: Option<f32>,
}

impl Scores<'_> {
    #[inline(always)]
    fn score<const FMA: bool, const LANES: usize>(&self, position: usize, key: &[f32]) -> f32 {
        let mut score = super::kernels::dot_body::<FMA, LANES>(self.query, key) * self.scale;
        if let Some(slope) = self.slope {
            score += slope * position as f32;
        }
        match self.softcap {
            Some(cap) => softcap(score, cap),
            None => score,
        }
    }
}

/// `y += a · x`, rounding the product before the sum on every target.
#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}
