//! Causal scaled-dot-product attention of a step's queries, each over its sequence's cached
//! keys and values: each query head materialises its scores, or, with a tile, walks the keys
//! in tiles with an online softmax that holds one tile of scores at a time. A quantized cache
//! is read in place: each key's score is its codes' dot product times its scale, each value's
//! weight folds in its.

use super::kernels::multiply_add;
use super::pool;
use crate::backend::kv::{KvDtype, KvElement, E4M3};
use crate::backend::math::{softcap, softmax};
use crate::backend::tensor::Matrix;
use crate::backend::AttentionShape;
use crate::backend::{AttendOptions, AttendSequence, KvView};

pub fn attention(
    q: &Matrix,
    positions: &[usize],
    sequences: &[AttendSequence<'_>],
    shape: &AttentionShape,
    options: AttendOptions<'_>,
) -> Matrix {
    let dtype = sequences.first().map_or(KvDtype::F32, |s| s.kv.dtype);
    assert!(
        sequences.iter().all(|s| s.kv.dtype == dtype),
        "attention: one step's caches hold one element type"
    );
    match dtype {
        KvDtype::F32 => attend::<f32>(q, positions, sequences, shape, options),
        KvDtype::Int8 => attend::<i8>(q, positions, sequences, shape, options),
        KvDtype::Fp8E4M3 => attend::<E4M3>(q, positions, sequences, shape, options),
    }
}

/// One task per query row and key/value head: the query heads that share a key/value head
/// read its cached tokens together, so each key and value is fetched once per group rather
/// than once per query head, and a decode step of many sequences is one parallel region.
fn attend<E: KvElement>(
    q: &Matrix,
    positions: &[usize],
    sequences: &[AttendSequence<'_>],
    shape: &AttentionShape,
    options: AttendOptions<'_>,
) -> Matrix {
    let mut out = Matrix::zeros(q.rows, shape.heads * shape.head_dim);
    let mut owner = vec![0; q.rows];
    for (s, sequence) in sequences.iter().enumerate() {
        owner[sequence.rows.clone()].fill(s);
    }
    let group = shape.heads / shape.kv_heads;
    #[cfg(target_arch = "x86_64")]
    let (avx512, avx2) = (
        std::is_x86_feature_detected!("avx512f"),
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
    );
    pool::pool().for_each_chunk(&mut out.data, group * shape.head_dim, |index, out_group| {
        let row = index / shape.kv_heads;
        let task = Group {
            q,
            kv: &sequences[owner[row]].kv,
            position: positions[row],
            shape,
            options,
            row,
            kv_head: index % shape.kv_heads,
        };
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY (both): the features were detected above.
            if avx512 {
                return unsafe { group_avx512::<E>(&task, out_group) };
            }
            if avx2 {
                return unsafe { group_avx2::<E>(&task, out_group) };
            }
        }
        group_body::<E, false, 16>(&task, out_group);
    });
    out
}

/// One task of [`attention`]: the query heads of row `row` that share key/value head
/// `kv_head`.
struct Group<'a, 'k> {
    q: &'a Matrix,
    kv: &'a KvView<'k>,
    position: usize,
    shape: &'a AttentionShape,
    options: AttendOptions<'a>,
    row: usize,
    kv_head: usize,
}

/// [`group_body`] compiled for AVX-512: its dot products and sums run 16 lanes wide, with the
/// lanes of `math::dot` there.
///
/// # Safety
/// AVX-512F must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn group_avx512<E: KvElement>(task: &Group<'_, '_>, out_group: &mut [f32]) {
    group_body::<E, true, 32>(task, out_group);
}

/// [`group_body`] compiled for AVX2 and FMA.
///
/// # Safety
/// AVX2 and FMA must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn group_avx2<E: KvElement>(task: &Group<'_, '_>, out_group: &mut [f32]) {
    group_body::<E, true, 32>(task, out_group);
}

/// A visible token of one key/value head: its key codes and scale, its value codes and scale
/// (1 for an f32 cache).
type Visible<'k, E> = (&'k [E], f32, &'k [E], f32);

/// `LANES`-wide accumulators, fused multiply-adds where `FMA` (only fast where the target
/// has them). Plain loops and `inline(always)` helpers only: a closure that is not inlined is
/// compiled without the caller's target features, and its `mul_add` becomes a libm call.
///
/// A head's arithmetic depends only on the model's shape, never on which rows or sequences
/// share the step.
#[inline(always)]
fn group_body<E: KvElement, const FMA: bool, const LANES: usize>(
    task: &Group<'_, '_>,
    out_group: &mut [f32],
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
        scale,
        tile,
    } = *task.shape;
    let (kv, kv_head) = (task.kv, task.kv_head);
    let kv_dim = kv_heads * hd;
    let group = heads / kv_heads;
    let offset = kv_head * hd;
    // A query sees cached tokens up to and including its own position; with a window,
    // only the latest `window` of them.
    let end = (task.position + 1).min(kv.tokens);
    let start = task.options.window.map_or(0, |w| end.saturating_sub(w));
    let queries = &task.q.row(task.row)[offset * group..(offset + hd) * group];
    let queries = match group >= HEAD_LANES / 2 {
        true => Queries::Lanes(side_by_side(queries, group, hd)),
        false => Queries::Heads(queries),
    };
    let finish = Finish {
        scale,
        slopes: task
            .options
            .alibi
            .map(|slopes| &slopes[kv_head * group..(kv_head + 1) * group]),
        softcap: task.options.softcap,
    };
    let scale_of = |scales: &[f32], token: usize| match scales.is_empty() {
        true => 1.0,
        false => scales[token * kv_heads + kv_head],
    };
    let mut visible: Vec<Visible<'_, E>> = Vec::with_capacity(end - start);
    let mut position = kv.first;
    'chunks: for (keys, values) in kv.keys.iter().zip(&kv.values) {
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
    // Scores of head `g` for the keys of a pass are `scores[g * width..][..keys]`.
    let width = tile.unwrap_or(visible.len()).max(1);
    let mut scores = vec![0.0f32; group * width];
    let Some(tile) = tile else {
        score_keys::<E, FMA, LANES>(&queries, &finish, &visible, start, width, &mut scores);
        for head_scores in scores.chunks_exact_mut(width) {
            softmax(&mut head_scores[..visible.len()]);
        }
        add_values(&scores, &visible, width, out_group);
        return;
    };
    // Online softmax: keep each head's running maximum and sum of exponentials, and rescale
    // what was accumulated whenever the maximum grows.
    let mut max = vec![f32::NEG_INFINITY; group];
    let mut sum = vec![0.0f32; group];
    for (t, keys) in visible.chunks(tile).enumerate() {
        let first = start + t * tile;
        score_keys::<E, FMA, LANES>(&queries, &finish, keys, first, width, &mut scores);
        for (g, out_head) in out_group.chunks_exact_mut(hd).enumerate() {
            let head_scores = &mut scores[g * width..g * width + keys.len()];
            let tile_max = head_scores
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[g].max(tile_max);
            let correction = (max[g] - new_max).exp();
            sum[g] *= correction;
            for o in out_head.iter_mut() {
                *o *= correction;
            }
            for s in head_scores.iter_mut() {
                *s = (*s - new_max).exp();
                sum[g] += *s;
            }
            max[g] = new_max;
        }
        add_values(&scores, keys, width, out_group);
    }
    for (out_head, sum) in out_group.chunks_exact_mut(hd).zip(&sum) {
        let inv = 1.0 / sum;
        for o in out_head.iter_mut() {
            *o *= inv;
        }
    }
}

/// Query heads scored side by side, one per lane of a vector.
const HEAD_LANES: usize = 8;

/// How a group's queries meet a key. Groups of at least half a vector of heads go side by
/// side, one head per lane, so that no score ends in a sum across lanes; smaller groups go
/// one head at a time, each score a dot product across the lanes of its elements.
enum Queries<'a> {
    /// `lanes[p * head_dim + d][l]`: element `d` of head `p * HEAD_LANES + l` (zero past
    /// the group).
    Lanes(Vec<[f32; HEAD_LANES]>),
    /// The group's queries, one head after another.
    Heads(&'a [f32]),
}

/// `queries` (`group` heads of `hd` elements) transposed into passes of `HEAD_LANES` heads.
fn side_by_side(queries: &[f32], group: usize, hd: usize) -> Vec<[f32; HEAD_LANES]> {
    let passes = group.div_ceil(HEAD_LANES);
    let mut lanes = vec![[0.0f32; HEAD_LANES]; passes * hd];
    for (g, query) in queries.chunks_exact(hd).enumerate() {
        let (pass, lane) = (g / HEAD_LANES, g % HEAD_LANES);
        for (d, q) in query.iter().enumerate() {
            lanes[pass * hd + d][lane] = *q;
        }
    }
    lanes
}

/// `scores[g * width + t]`: head `g`'s score of `keys[t]`, the key at position `first + t`.
#[inline(always)]
fn score_keys<E: KvElement, const FMA: bool, const LANES: usize>(
    queries: &Queries<'_>,
    finish: &Finish<'_>,
    keys: &[Visible<'_, E>],
    first: usize,
    width: usize,
    scores: &mut [f32],
) {
    let group = scores.len() / width;
    for (t, (key, key_scale, _, _)) in keys.iter().enumerate() {
        let position = first + t;
        match queries {
            Queries::Lanes(lanes) => {
                for (pass, heads) in lanes.chunks_exact(key.len()).enumerate() {
                    let dots = lanes_dot::<E, FMA>(heads, key);
                    let pass_start = pass * HEAD_LANES;
                    for (l, dot) in dots.iter().take(group - pass_start).enumerate() {
                        let g = pass_start + l;
                        scores[g * width + t] = finish.score(g, position, dot * key_scale);
                    }
                }
            }
            Queries::Heads(heads) => {
                for (g, query) in heads.chunks_exact(key.len()).enumerate() {
                    let dot = super::kernels::dot_body::<FMA, LANES>(query, key);
                    scores[g * width + t] = finish.score(g, position, dot * key_scale);
                }
            }
        }
    }
}

/// The dot products of `key` with the `HEAD_LANES` heads of a pass. Eight chains over the
/// elements keep the multiply-add units busy; their sums meet pairwise.
#[inline(always)]
fn lanes_dot<E: KvElement, const FMA: bool>(
    heads: &[[f32; HEAD_LANES]],
    key: &[E],
) -> [f32; HEAD_LANES] {
    const CHAINS: usize = 8;
    let mut acc = [[0.0f32; HEAD_LANES]; CHAINS];
    let (head_chunks, head_tail) = heads.as_chunks::<CHAINS>();
    let (key_chunks, key_tail) = key.as_chunks::<CHAINS>();
    for (hc, kc) in head_chunks.iter().zip(key_chunks) {
        for j in 0..CHAINS {
            let k = kc[j].widen();
            for l in 0..HEAD_LANES {
                acc[j][l] = multiply_add::<FMA>(hc[j][l], k, acc[j][l]);
            }
        }
    }
    for (h, k) in head_tail.iter().zip(key_tail) {
        let k = k.widen();
        for (a, q) in acc[0].iter_mut().zip(h) {
            *a = multiply_add::<FMA>(*q, k, *a);
        }
    }
    let mut chains = CHAINS;
    while chains > 1 {
        chains /= 2;
        let (low, high) = acc.split_at_mut(chains);
        for (low, high) in low.iter_mut().zip(high.iter()) {
            for (a, b) in low.iter_mut().zip(high) {
                *a += b;
            }
        }
    }
    acc[0]
}

/// Adds each value of `keys` to every head's output, weighted by that head's score of it.
#[inline(always)]
fn add_values<E: KvElement>(
    scores: &[f32],
    keys: &[Visible<'_, E>],
    width: usize,
    out_group: &mut [f32],
) {
    let hd = out_group.len() / (scores.len() / width);
    for (t, (_, _, value, value_scale)) in keys.iter().enumerate() {
        for (g, out_head) in out_group.chunks_exact_mut(hd).enumerate() {
            axpy(scores[g * width + t] * value_scale, value, out_head);
        }
    }
}

/// What turns a head's dot product with a key (times the key's scale) into its score.
struct Finish<'a> {
    scale: f32,
    /// ALiBi, per head of the group: the score gains `slope · key position`.
    slopes: Option<&'a [f32]>,
    softcap: Option<f32>,
}

impl Finish<'_> {
    #[inline(always)]
    fn score(&self, head: usize, position: usize, dot: f32) -> f32 {
        let mut score = dot * self.scale;
        if let Some(slopes) = self.slopes {
            score += slopes[head] * position as f32;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::kv::KvChunk;
    use crate::backend::test_values;

    /// The definition, in f64: softmax over the visible keys of the scaled (biased, capped)
    /// dot products, times the values.
    fn reference(
        shape: &AttentionShape,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        position: usize,
        options: AttendOptions<'_>,
    ) -> Vec<f32> {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
            scale,
            ..
        } = *shape;
        let kv_dim = kv_heads * hd;
        let start = options
            .window
            .map_or(0, |w| (position + 1).saturating_sub(w));
        let mut out = vec![0.0f32; heads * hd];
        for head in 0..heads {
            let kv = head / (heads / kv_heads) * hd;
            let query = &q[head * hd..(head + 1) * hd];
            let scores: Vec<f64> = (start..=position)
                .map(|t| {
                    let key = &keys[t * kv_dim + kv..t * kv_dim + kv + hd];
                    let dot: f64 = query.iter().zip(key).map(|(a, b)| f64::from(a * b)).sum();
                    let mut s = dot * f64::from(scale);
                    if let Some(slopes) = options.alibi {
                        s += f64::from(slopes[head]) * t as f64;
                    }
                    options
                        .softcap
                        .map_or(s, |c| f64::from(c) * (s / f64::from(c)).tanh())
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for (i, s) in scores.iter().enumerate() {
                let w = (s - max).exp() / total;
                let value = &values[(start + i) * kv_dim + kv..][..hd];
                for (o, v) in out[head * hd..(head + 1) * hd].iter_mut().zip(value) {
                    *o += (w * f64::from(*v)) as f32;
                }
            }
        }
        out
    }

    /// Groups of 3 heads go one head at a time, of 8 (MQA) and 12 side by side (one pass and
    /// a part); a head of 12 elements leaves a tail after the chains of 8.
    #[test]
    fn a_batch_of_sequences_equals_each_alone_and_the_definition() {
        for (heads, kv_heads) in [(6, 2), (8, 1), (24, 2)] {
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim: 12,
                scale: 0.35,
                tile: None,
            };
            batch_equals_alone_and_definition(&shape);
        }
    }

    /// A cache in blocks of two tokens, as a paged cache gives them.
    fn view((keys, values): &(Vec<f32>, Vec<f32>), kv_dim: usize) -> KvView<'_> {
        KvView {
            keys: keys.chunks(2 * kv_dim).map(KvChunk::F32).collect(),
            values: values.chunks(2 * kv_dim).map(KvChunk::F32).collect(),
            tokens: keys.len() / kv_dim,
            first: 0,
            dtype: KvDtype::F32,
        }
    }

    fn batch_equals_alone_and_definition(shape: &AttentionShape) {
        let kv_dim = shape.kv_heads * shape.head_dim;
        let width = shape.heads * shape.head_dim;
        // (cached tokens, new rows): a prefill chunk, decodes, a longer prefill.
        let sequences = [(5, 3), (9, 1), (1, 1), (12, 4)];
        let caches: Vec<(Vec<f32>, Vec<f32>)> = sequences
            .iter()
            .enumerate()
            .map(|(s, &(tokens, _))| {
                let seed = 10 * s as u32;
                (
                    test_values(tokens * kv_dim, seed + 1),
                    test_values(tokens * kv_dim, seed + 2),
                )
            })
            .collect();
        let rows: usize = sequences.iter().map(|&(_, n)| n).sum();
        let q = Matrix::from_vec(rows, width, test_values(rows * width, 99));
        let mut positions = Vec::new();
        let mut batch = Vec::new();
        for (&(tokens, n), cache) in sequences.iter().zip(&caches) {
            let first = positions.len();
            positions.extend(tokens - n..tokens);
            batch.push(AttendSequence {
                rows: first..first + n,
                kv: view(cache, kv_dim),
            });
        }
        let slopes: Vec<f32> = (0..shape.heads).map(|h| 0.5 / (h + 1) as f32).collect();
        let variants = [
            AttendOptions::default(),
            AttendOptions {
                window: Some(3),
                softcap: Some(2.0),
                alibi: Some(&slopes),
            },
        ];
        for options in variants {
            for tile in [None, Some(2)] {
                let shape = AttentionShape { tile, ..*shape };
                let together = attention(&q, &positions, &batch, &shape, options);
                for (sequence, cache) in batch.iter().zip(&caches) {
                    let alone = attention(
                        &q.rows_range(sequence.rows.clone()),
                        &positions[sequence.rows.clone()],
                        &[AttendSequence {
                            rows: 0..sequence.rows.len(),
                            kv: view(cache, kv_dim),
                        }],
                        &shape,
                        options,
                    );
                    for (i, row) in sequence.rows.clone().enumerate() {
                        let what = format!("{shape:?}, row {row}");
                        assert_eq!(together.row(row), alone.row(i), "{what}");
                        let (keys, values) = cache;
                        let expected =
                            reference(&shape, q.row(row), keys, values, positions[row], options);
                        for (got, want) in together.row(row).iter().zip(&expected) {
                            assert!((got - want).abs() < 1e-5, "{what}: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
