//! v2343 `gptq`: GPTQ (Frantar et al., 2022) in its checkpoint layout (AutoGPTQ's `gptq`
//! format, which exllama and transformers read). Loading: `qweight` `[in·bits/32, out]` int32
//! packs consecutive input rows into a word, row `k` at bits `k·bits`; `qzeros`
//! `[groups, out·bits/32]` packs consecutive output columns the same way, each stored minus
//! one; `scales` `[groups, out]` f16; `g_idx` `[in]` the group of each input feature (in any
//! order under act-order); `weight = scale · (q − zero)`. 4 and 8 bits.

use anyhow::{bail, ensure};
use faer::linalg::matmul::matmul;
use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, Par, Side};
use vibee_core::io::weights::Weights;
use vibee_core::{App, Plugin, PluginSpec};

use super::integer::{
    check_finite, min_max_group, quantize_value, scale_groups, IntegerWeights, StoredTensor,
};
use super::register_stored;

pub struct Gptq;

impl Plugin for Gptq {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2343",
            name: "gptq",
        }
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        register_stored(app, "gptq", read);
        Ok(())
    }
}

/// The layer `prefix` (`[out, in]`) from its GPTQ tensors.
pub fn read(
    weights: &Weights,
    prefix: &str,
    out: usize,
    inp: usize,
) -> anyhow::Result<IntegerWeights> {
    let (qweight, shape) = weights.int32(&format!("{prefix}.qweight"))?;
    let bits = match shape.as_slice() {
        // Checked: `inp` comes from the config, which may claim anything.
        [rows, cols] if *cols == out && Some(rows * 32) == inp.checked_mul(4) => 4,
        [rows, cols] if *cols == out && Some(rows * 32) == inp.checked_mul(8) => 8,
        _ => bail!("qweight has shape {shape:?}, which packs neither 4 nor 8 bits of a [{out}, {inp}] layer"),
    };
    let per_word = 32 / bits as usize;
    let mask = (1u32 << bits) - 1;
    let scales_name = format!("{prefix}.scales");
    let groups = scale_groups(weights, &scales_name)?;
    let scales = weights.get(&scales_name, &[groups, out])?.to_f32_vec();
    check_finite(&scales_name, &scales)?;
    let (qzeros, zero_shape) = weights.int32(&format!("{prefix}.qzeros"))?;
    ensure!(
        zero_shape == [groups, out / per_word] && out.is_multiple_of(per_word),
        "qzeros has shape {zero_shape:?}, expected [{groups}, {}]",
        out / per_word
    );
    let g_idx = format!("{prefix}.g_idx");
    let group_of = if weights.contains(&g_idx) {
        let (g, g_shape) = weights.int32(&g_idx)?;
        ensure!(
            g_shape == [inp],
            "g_idx has shape {g_shape:?}, expected [{inp}]"
        );
        ensure!(g.iter().all(|g| *g >= 0), "g_idx holds a negative group");
        g.into_iter().map(|g| g as u32).collect()
    } else {
        ensure!(
            inp.is_multiple_of(groups),
            "{groups} groups do not divide {inp} inputs"
        );
        IntegerWeights::sequential_groups(inp, inp / groups)
    };
    let mut quants = vec![0u8; out * inp];
    for (r, row) in qweight.chunks_exact(out).enumerate() {
        for (o, word) in row.iter().enumerate() {
            for k in 0..per_word {
                quants[o * inp + r * per_word + k] =
                    ((*word as u32 >> (bits * k as u32)) & mask) as u8;
            }
        }
    }
    let zeros = qzeros
        .iter()
        .flat_map(|word| {
            (0..per_word).map(move |k| ((*word as u32 >> (bits * k as u32)) & mask) as f32 + 1.0)
        })
        .collect();
    Ok(IntegerWeights {
        bits,
        out,
        inp,
        quants,
        group_of,
        scales,
        zeros,
    })
}

/// The GPTQ tensors of a layer.
pub fn write(layer: &IntegerWeights, prefix: &str) -> anyhow::Result<Vec<StoredTensor>> {
    let (out, inp, groups, bits) = (layer.out, layer.inp, layer.groups(), layer.bits);
    let per_word = 32 / bits as usize;
    ensure!(
        out.is_multiple_of(per_word) && inp.is_multiple_of(per_word),
        "the GPTQ layout packs {per_word} values to a word"
    );
    // Value k of a word sits at bits k·bits (values are below 2^bits).
    let word = |values: &mut dyn Iterator<Item = u32>| {
        values
            .enumerate()
            .fold(0u32, |w, (k, v)| w | v << (bits * k as u32))
    };
    // Words pack input rows, so the values go row-group by row-group, each across outputs.
    let mut qweight = vec![0u32; inp / per_word * out];
    for (r, chunk) in qweight.chunks_exact_mut(out).enumerate() {
        for (o, w) in chunk.iter_mut().enumerate() {
            let start = o * inp + r * per_word;
            *w = word(
                &mut layer.quants[start..start + per_word]
                    .iter()
                    .map(|q| *q as u32),
            );
        }
    }
    ensure!(
        layer
            .zeros
            .iter()
            .all(|z| z.fract() == 0.0 && (1.0..=(1 << bits) as f32).contains(z)),
        "the GPTQ layout stores whole zero points 1…2^bits (zero − 1 in {bits} bits)"
    );
    let qzeros: Vec<u32> = layer
        .zeros
        .chunks_exact(per_word)
        .map(|zeros| word(&mut zeros.iter().map(|z| *z as u32 - 1)))
        .collect();
    Ok(vec![
        StoredTensor::int32(
            format!("{prefix}.qweight"),
            vec![inp / per_word, out],
            &qweight,
        ),
        StoredTensor::int32(
            format!("{prefix}.qzeros"),
            vec![groups, out / per_word],
            &qzeros,
        ),
        StoredTensor::f16(format!("{prefix}.scales"), vec![groups, out], &layer.scales),
        StoredTensor::int32(format!("{prefix}.g_idx"), vec![inp], &layer.group_of),
    ])
}

/// Columns GPTQ quantizes before it applies their error feedback to the rest at once.
const LAZY_BLOCK: usize = 128;

/// GPTQ of one layer (Frantar et al., Algorithm 1, as AutoGPTQ runs it): columns are quantized
/// one at a time (in decreasing order of `H`'s diagonal with `act_order`), each column's
/// error, scaled by the inverse Hessian's Cholesky factor, is pushed onto the columns not yet
/// quantized — within a block of 128 at once, onto later blocks lazily as one product.
/// `weight` is `[out, in]` row-major, `hessian` `Σ xᵀx`; the Hessian is damped by `damp` times
/// its mean diagonal. Groups of `group` columns (in quantization order) take min–max scales and
/// zero points from the weights with the error feedback of earlier blocks but not of earlier
/// columns of the same block — AutoGPTQ's order, which the reference reproduces.
pub fn quantize(
    weight: &[f32],
    out: usize,
    hessian: &Mat<f32>,
    bits: u32,
    group: usize,
    act_order: bool,
    damp: f64,
) -> anyhow::Result<IntegerWeights> {
    let inp = hessian.nrows();
    ensure!(
        inp.is_multiple_of(group),
        "{group} does not divide {inp} input features"
    );
    let mut h = Mat::<f64>::from_fn(inp, inp, |i, j| hessian[(i, j)] as f64);
    let mut w = Mat::<f64>::from_fn(out, inp, |r, c| weight[r * inp + c] as f64);
    // Features never seen carry no information: their weights are zeroed, their curvature set.
    for i in 0..inp {
        if h[(i, i)] == 0.0 {
            h[(i, i)] = 1.0;
            w.col_mut(i).fill(0.0);
        }
    }
    let mut order: Vec<usize> = (0..inp).collect();
    if act_order {
        order.sort_by(|a, b| h[(*b, *b)].total_cmp(&h[(*a, *a)]));
    }
    let mut h = Mat::<f64>::from_fn(inp, inp, |i, j| h[(order[i], order[j])]);
    let mut w = Mat::<f64>::from_fn(out, inp, |r, c| w[(r, order[c])]);
    let mean_diagonal = (0..inp).map(|i| h[(i, i)]).sum::<f64>() / inp as f64;
    for i in 0..inp {
        h[(i, i)] += damp * mean_diagonal;
    }
    let singular = |_| anyhow::anyhow!("the damped Hessian is not positive definite");
    let inverse = h.llt(Side::Lower).map_err(singular)?.inverse();
    // H⁻¹ = L Lᵀ, so U = Lᵀ is its upper Cholesky factor (H⁻¹ = UᵀU).
    let lower = inverse.llt(Side::Lower).map_err(singular)?;
    let u = lower.L().transpose().to_owned();
    let groups = inp / group;
    let (mut scales, mut zeros) = (vec![0.0f32; groups * out], vec![0.0f32; groups * out]);
    let mut quants = vec![0u8; out * inp];
    let mut values = vec![0.0f32; group];
    for start in (0..inp).step_by(LAZY_BLOCK) {
        let end = (start + LAZY_BLOCK).min(inp);
        let mut block = w.subcols(start, end - start).to_owned();
        let mut errors = Mat::<f64>::zeros(out, end - start);
        for i in 0..end - start {
            let column = start + i;
            let g = column / group;
            if column % group == 0 {
                for r in 0..out {
                    for (k, v) in values.iter_mut().enumerate() {
                        *v = w[(r, column + k)] as f32;
                    }
                    let (scale, zero) = min_max_group(&values, bits, true);
                    // The layout stores zero − 1 in `bits` bits: a zero point of 0 cannot be
                    // written (AutoGPTQ's packing wraps it to 2^bits), so it becomes 1.
                    (scales[g * out + r], zeros[g * out + r]) = (scale, zero.max(1.0));
                }
            }
            let d = u[(column, column)];
            for r in 0..out {
                let (scale, zero) = (scales[g * out + r], zeros[g * out + r]);
                let value = block[(r, i)];
                let q = quantize_value(value as f32, scale, zero, bits);
                quants[r * inp + column] = q;
                errors[(r, i)] = (value - (scale * (q as f32 - zero)) as f64) / d;
            }
            for j in i + 1..end - start {
                let factor = u[(column, start + j)];
                for r in 0..out {
                    block[(r, j)] -= errors[(r, i)] * factor;
                }
            }
        }
        if end < inp {
            matmul(
                w.subcols_mut(end, inp - end),
                Accum::Add,
                errors.as_ref(),
                u.submatrix(start, end, end - start, inp - end),
                -1.0,
                Par::rayon(0),
            );
        }
    }
    // Back to the checkpoint's column order; `g_idx` records each column's group.
    let mut layer = IntegerWeights {
        bits,
        out,
        inp,
        quants: vec![0; out * inp],
        group_of: vec![0; inp],
        scales,
        zeros,
    };
    for (position, column) in order.iter().enumerate() {
        layer.group_of[*column] = (position / group) as u32;
        for r in 0..out {
            layer.quants[r * inp + column] = quants[r * inp + position];
        }
    }
    Ok(layer)
}
