//! v2342 `awq`: activation-aware weight quantization (Lin et al., 2023) in AutoAWQ's GEMM
//! checkpoint layout. Loading: `qweight` `[in, out/8]` int32 packs eight output columns per
//! word, column `ORDER[k]` of the eight in nibble `k`; `qzeros` `[in/g, out/8]` packs the zero
//! points the same way; `scales` `[in/g, out]` f16; `weight = scale · (q − zero)`. The
//! activation-aware scales are already folded into the preceding norms and projections.

use anyhow::{bail, ensure};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use vibee_core::io::weights::Weights;
use vibee_core::{App, Plugin, PluginSpec};

use super::calibration::InputStats;
use super::integer::{check_finite, round_trip, scale_groups, IntegerWeights, StoredTensor};
use super::register_stored;

pub struct Awq;

impl Plugin for Awq {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2342",
            name: "awq",
        }
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        register_stored(app, "awq", read);
        Ok(())
    }
}

/// The output column held by nibble `k` of a packed word.
const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Unpacks rows of words holding eight columns each, in AWQ's nibble order.
fn unpack(words: &[i32]) -> Vec<u8> {
    let mut values = vec![0u8; words.len() * 8];
    for (w, word) in words.iter().enumerate() {
        for (k, column) in ORDER.iter().enumerate() {
            values[w * 8 + column] = ((*word as u32 >> (4 * k)) & 0xF) as u8;
        }
    }
    values
}

/// Packs rows of values eight columns to a word, in AWQ's nibble order.
fn pack(values: impl Iterator<Item = u8>) -> Vec<u32> {
    let values: Vec<u8> = values.collect();
    values
        .chunks_exact(8)
        .map(|eight| {
            ORDER.iter().enumerate().fold(0u32, |word, (k, column)| {
                word | (eight[*column] as u32) << (4 * k)
            })
        })
        .collect()
}

/// The layer `prefix` (`[out, in]`) from its AutoAWQ tensors.
pub fn read(
    weights: &Weights,
    prefix: &str,
    out: usize,
    inp: usize,
) -> anyhow::Result<IntegerWeights> {
    let (qweight, shape) = weights.int32(&format!("{prefix}.qweight"))?;
    ensure!(
        shape == [inp, out / 8] && out.is_multiple_of(8),
        "qweight has shape {shape:?}, but the config implies [{inp}, {}]",
        out / 8
    );
    let scales_name = format!("{prefix}.scales");
    let groups = scale_groups(weights, &scales_name)?;
    if !inp.is_multiple_of(groups) {
        bail!("{groups} scale groups do not divide {inp} input features");
    }
    let scales = weights.get(&scales_name, &[groups, out])?.to_f32_vec();
    check_finite(&scales_name, &scales)?;
    let (qzeros, zero_shape) = weights.int32(&format!("{prefix}.qzeros"))?;
    ensure!(
        zero_shape == [groups, out / 8],
        "qzeros has shape {zero_shape:?}, expected [{groups}, {}]",
        out / 8
    );
    // qweight is [in, out]: transpose to the [out, in] rows the kernels read.
    let by_input = unpack(&qweight);
    let mut quants = vec![0u8; out * inp];
    for i in 0..inp {
        for o in 0..out {
            quants[o * inp + i] = by_input[i * out + o];
        }
    }
    Ok(IntegerWeights {
        bits: 4,
        out,
        inp,
        quants,
        group_of: IntegerWeights::sequential_groups(inp, inp / groups),
        scales,
        zeros: unpack(&qzeros).into_iter().map(f32::from).collect(),
    })
}

/// The AutoAWQ tensors of a layer quantized with groups in order.
pub fn write(layer: &IntegerWeights, prefix: &str) -> anyhow::Result<Vec<StoredTensor>> {
    let (out, inp, groups) = (layer.out, layer.inp, layer.groups());
    ensure!(
        layer.bits == 4
            && layer.group_of.is_sorted()
            && out.is_multiple_of(8)
            && layer.zeros.iter().all(|z| z.fract() == 0.0),
        "the AWQ layout holds 4-bit weights with whole zero points, groups in order and output features in eights"
    );
    let by_input = (0..inp).flat_map(|i| (0..out).map(move |o| layer.quants[o * inp + i]));
    let zeros = layer.zeros.iter().map(|z| *z as u8);
    Ok(vec![
        StoredTensor::int32(
            format!("{prefix}.qweight"),
            vec![inp, out / 8],
            &pack(by_input),
        ),
        StoredTensor::int32(
            format!("{prefix}.qzeros"),
            vec![groups, out / 8],
            &pack(zeros),
        ),
        StoredTensor::f16(format!("{prefix}.scales"), vec![groups, out], &layer.scales),
    ])
}

/// The exponents AWQ tries: α = 0, 1/20, …, 19/20 (α = 0 is plain round-to-nearest).
const GRID: usize = 20;

/// Output rows per projection on which the search measures its loss (evenly spaced).
const LOSS_ROWS: usize = 256;

/// AWQ's search (Lin et al., §3.2) for projections sharing one input: per input feature,
/// `s = m^α / √(max(m^α)·min(m^α))` with `m` the mean |x| the feature had on calibration text,
/// and the α of the grid whose round-to-nearest quantization of `W·diag(s)` (4 bits, groups
/// of `group`, AutoAWQ's min–max rule), scaled back by `1/s`, changes the projections' outputs
/// least: `Σ ΔW H ΔWᵀ` with `H = Σ xᵀx`, estimated on up to 256 rows of each projection.
/// `projections` are `[out, in]` row-major weights.
pub fn search_scales(projections: &[&[f32]], stats: &InputStats, group: usize) -> Vec<f32> {
    let inp = stats.hessian.nrows();
    let magnitude = stats.mean_magnitude();
    let loss = |scales: &[f32]| -> f64 {
        projections
            .iter()
            .map(|weight| {
                let out = weight.len() / inp;
                let step = out.div_ceil(LOSS_ROWS);
                let rows: Vec<usize> = (0..out).step_by(step).collect();
                let mut delta = Mat::<f32>::zeros(rows.len(), inp);
                let (mut scaled, mut restored) = (vec![0.0f32; inp], vec![0.0f32; inp]);
                for (k, r) in rows.iter().enumerate() {
                    let row = &weight[r * inp..(r + 1) * inp];
                    for ((s, w), f) in scaled.iter_mut().zip(row).zip(scales) {
                        *s = w * f;
                    }
                    for (values, out) in scaled
                        .chunks_exact(group)
                        .zip(restored.chunks_exact_mut(group))
                    {
                        round_trip(values, 4, false, out);
                    }
                    for i in 0..inp {
                        delta[(k, i)] = row[i] - restored[i] / scales[i];
                    }
                }
                let mut product = Mat::<f32>::zeros(rows.len(), inp);
                matmul(
                    product.as_mut(),
                    Accum::Replace,
                    delta.as_ref(),
                    stats.hessian.as_ref(),
                    1.0,
                    Par::rayon(0),
                );
                let mut total = 0.0f64;
                for i in 0..inp {
                    for k in 0..rows.len() {
                        total += (product[(k, i)] * delta[(k, i)]) as f64;
                    }
                }
                total
            })
            .sum()
    };
    let mut best = (f64::INFINITY, vec![1.0; inp]);
    for step in 0..GRID {
        let alpha = step as f32 / GRID as f32;
        let raw: Vec<f32> = magnitude.iter().map(|m| m.powf(alpha).max(1e-4)).collect();
        let (max, min) = raw.iter().fold((0.0f32, f32::INFINITY), |(hi, lo), s| {
            (hi.max(*s), lo.min(*s))
        });
        let norm = (max * min).sqrt();
        let scales: Vec<f32> = raw.iter().map(|s| s / norm).collect();
        let candidate = loss(&scales);
        if candidate < best.0 {
            best = (candidate, scales);
        }
    }
    best.1
}

/// Shrink steps of AWQ's clipping search: the range `[−m, m]` of a group (m its max |w|)
/// shrinks to `(1 − k/20)·m` for k = 0…9, as AutoAWQ searches it.
const CLIP_STEPS: usize = 10;

/// AWQ's clipping search (AutoAWQ's `auto_clip`), after scaling: each group of `group` weights
/// of each row (`weight` holds `W·diag(s)`, `[out, in]` row-major) is clamped to the shrunken
/// range whose round-to-nearest quantization changes the group's share of the output least,
/// `δ H_g δᵀ` with `H_g` the group's block of `diag(1/s)·H·diag(1/s)`.
pub fn clip(weight: &mut [f32], stats: &InputStats, scales: &[f32], group: usize) {
    use rayon::prelude::*;
    let inp = scales.len();
    let h = &stats.hessian;
    // Every row shares the groups' blocks of the scaled Hessian.
    let blocks: Vec<Vec<f32>> = (0..inp / group)
        .map(|g| {
            let first = g * group;
            (0..group * group)
                .map(|k| {
                    let (i, j) = (first + k / group, first + k % group);
                    h[(i, j)] / (scales[i] * scales[j])
                })
                .collect()
        })
        .collect();
    weight.par_chunks_exact_mut(inp).for_each(|row| {
        let (mut clipped, mut delta) = (vec![0.0f32; group], vec![0.0f32; group]);
        for (values, block) in row.chunks_exact_mut(group).zip(&blocks) {
            let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let mut best = (f32::INFINITY, max);
            for step in 0..CLIP_STEPS {
                let limit = max * (1.0 - step as f32 / 20.0);
                for (c, v) in clipped.iter_mut().zip(values.iter()) {
                    *c = v.clamp(-limit, limit);
                }
                round_trip(&clipped, 4, false, &mut delta);
                for (d, v) in delta.iter_mut().zip(values.iter()) {
                    *d = v - *d;
                }
                let error: f32 = block
                    .chunks_exact(group)
                    .zip(&delta)
                    .map(|(h_row, d)| d * h_row.iter().zip(&delta).map(|(h, e)| h * e).sum::<f32>())
                    .sum();
                if error < best.0 {
                    best = (error, limit);
                }
            }
            for v in values.iter_mut() {
                *v = v.clamp(-best.1, best.1);
            }
        }
    });
}
