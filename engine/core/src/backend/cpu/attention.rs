//! Causal scaled-dot-product attention over a sequence's cached keys and values: each query
//! head materialises its scores, or, with a tile, walks the keys in tiles with an online
//! softmax that holds one tile of scores at a time. A quantized cache is read in place: each
//! key's score is its codes' dot product times its scale, each value's weight folds in its.

use super::pool;
use crate::backend::kv::{KvDtype, KvElement, E4M3};
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
    match kv.dtype {
        KvDtype::F32 => attend::<f32>(q, kv, positions, shape, options),
        KvDtype::Int8 => attend::<i8>(q, kv, positions, shape, options),
        KvDtype::Fp8E4M3 => attend::<E4M3>(q, kv, positions, shape, options),
    }
}

fn attend<E: KvElement>(
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
                return unsafe { head_avx512::<E>(&head, out_head) };
            }
            if avx2 {
                return unsafe { head_avx2::<E>(&head, out_head) };
            }
        }
        head_body::<E, false, 16>(&head, out_head);
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
unsafe fn head_avx512<E: KvElement>(head: &Head<'_, '_>, out_head: &mut [f32]) {
    head_body::<E, true, 32>(head, out_head);
}

/// [`head_body`] compiled for AVX2 and FMA.
///
/// # Safety
/// AVX2 and FMA must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_avx2<E: KvElement>(head: &Head<'_, '_>, out_head: &mut [f32]) {
    head_body::<E, true, 32>(head, out_head);
}

/// A visible token of one head: its key codes and scale, its value codes and scale (1 for an
/// f32 cache).
type Visible<'k, E> = (&'k [E], f32, &'k [E], f32);

/// `LANES`-wide accumulators, fused multiply-adds where `FMA` (only fast where the target
/// has them). Plain loops and `inline(always)` helpers only: a closure that is not inlined is
/// compiled without the caller's target features, and its `mul_add` becomes a libm call.
#[inline(always)]
fn head_body<E: KvElement, const FMA: bool, const LANES: usize>(
    h: &Head<'_, '_>,
    out_head: &mut [f32],
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
        scale,
        tile,
    } = *h.shape;
    let kv_dim = kv_heads * hd;
    let (row, head) = (h.index / heads, h.index % heads);
    let kv_head = head / (heads / kv_heads);
    let offset = kv_head * hd;
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
    let scale_of = |scales: &[f32], token: usize| match scales.is_empty() {
        true => 1.0,
        false => scales[token * kv_heads + kv_head],
    };
    let mut visible: Vec<Visible<'_, E>> = Vec::with_capacity(end - start);
    let mut position = h.kv.first;
    'chunks: for (keys, values) in h.kv.keys.iter().zip(&h.kv.values) {
        let (Some((keys, key_scales)), Some((values, value_scales))) = (E::of(keys), E::of(values))
        else {
            continue;
        };
        let pairs = keys.chunks_exact(kv_dim).zip(values.chunks_exact(kv_dim));
        for (token, (key, value)) in pairs.enumerate() {
            if position >= end {
                break 'chunks;
            }
            if position >= start {
                visible.push((
                    &key[offset..offset + hd],
                    scale_of(key_scales, token),
                    &value[offset..offset + hd],
                    scale_of(value_scales, token),
                ));
            }
            position += 1;
        }
    }
    let Some(tile) = tile else {
        let mut scores = Vec::with_capacity(visible.len());
        for (i, (key, key_scale, _, _)) in visible.iter().enumerate() {
            scores.push(scores_of.score::<FMA, LANES>(start + i, key, *key_scale));
        }
        softmax(&mut scores);
        for ((_, _, value, value_scale), w) in visible.iter().zip(&scores) {
            axpy(*w * value_scale, value, out_head);
        }
        return;
    };
    // Online softmax: keep the running maximum and the sum of exponentials, and rescale
    // what was accumulated whenever the maximum grows.
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
    let mut scores = Vec::with_capacity(tile);
    for (t, pairs) in visible.chunks(tile).enumerate() {
        scores.clear();
        for (i, (key, key_scale, _, _)) in pairs.iter().enumerate() {
            scores.push(scores_of.score::<FMA, LANES>(start + t * tile + i, key, *key_scale));
        }
        let tile_max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let new_max = max.max(tile_max);
        let correction = (max - new_max).exp();
        sum *= correction;
        for o in out_head.iter_mut() {
            *o *= correction;
        }
        for (s, (_, _, value, value_scale)) in scores.iter().zip(pairs) {
            let w = (s - new_max).exp();
            sum += w;
            axpy(w * value_scale, value, out_head);
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
    fn score<const FMA: bool, const LANES: usize>(
        &self,
        position: usize,
        key: &[impl KvElement],
        key_scale: f32,
    ) -> f32 {
        let mut score =
            super::kernels::dot_body::<FMA, LANES>(self.query, key) * key_scale * self.scale;
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
fn axpy(a: f32, x: &[impl KvElement], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi.widen();
    }
}
