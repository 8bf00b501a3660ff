//! CPU kernels: the reference backend, and a real target.
//!
//! `linear` multiplies activations by a weight stored as `[out, in]` (the Hugging Face layout)
//! in f32, f16, bf16 or a quantized block type, reading f32, f16 and bf16 weights in place and
//! widening quantized blocks a few rows at a time, on the row-invariant kernels of
//! [`super::product`], split over threads by output rows.

use std::ops::Range;

use super::product::{product, WeightRows};
use crate::backend::cpu::pool;
use crate::backend::kv::KvElement;
use crate::backend::quant;
use crate::backend::tensor::Matrix;
use crate::io::weights::{Weight, WeightData};

/// `x · Wᵀ`: `x` is `[n, in]`, `w` is `[out, in]`; returns `[n, out]`.
pub fn linear(x: &Matrix, w: &Weight) -> Matrix {
    let (out_features, in_features) = (w.shape[0], w.shape[1]);
    assert_eq!(
        x.cols, in_features,
        "linear: input width does not match weight"
    );
    let mut out = Matrix::zeros(x.rows, out_features);
    let widen = |r: usize, row: &mut [f32]| w.row_to_f32(r, row);
    let rounded;
    let (x, rows) = match w.data() {
        WeightData::F32(data) => (x, WeightRows::F32(data)),
        WeightData::BF16(data) => (x, WeightRows::BF16(data)),
        WeightData::F16(data) => (x, WeightRows::F16(data)),
        WeightData::Blocks(_) => {
            // As in the packed kernels, quantized weights see activations rounded to int8 per
            // block.
            rounded = quant::round_activations(x);
            (&rounded, WeightRows::Widened(&widen))
        }
    };
    product(x, rows, &mut out);
    out
}

/// Bytes of activation rows one block of a product holds: a block stays in L2 while every
/// weight row of a thread's share passes over it, so a long prompt's activations are not
/// streamed from memory once per weight tile.
pub const ROW_BLOCK_BYTES: usize = 256 * 1024;

/// A product split over threads by weight (output) rows, `tile` weight rows at a time, over
/// blocks of `row_block` activation rows: `tile_dots(state, first, rows, dst)` writes the
/// products of the `dst.len() / rows.len()` weight rows from `first` (`tile`, or fewer at the
/// end) with activation rows `rows` into `dst`, one weight row after another; each thread has
/// its own `state` from `scratch` and writes its columns of `out` itself.
pub fn gemv_rows<S>(
    out: &mut Matrix,
    tile: usize,
    row_block: usize,
    scratch: impl Fn() -> S + Sync,
    tile_dots: impl Fn(&mut S, usize, Range<usize>, &mut [f32]) + Sync,
) {
    let (n, out_features) = (out.rows, out.cols);
    let pool = pool::pool();
    // One contiguous block of rows per thread: each streams its part of the weight in order.
    let rows_per_task = out_features.div_ceil(pool.threads()).next_multiple_of(tile);
    let tasks = out_features.div_ceil(rows_per_task);
    let row_block = row_block.clamp(1, n.max(1));
    let base = pool::SendPtr(out.data.as_mut_ptr());
    // Weight rows per pass over a block: their results fill whole cache lines of `out`.
    let span = 16usize.next_multiple_of(tile);
    pool.for_each_task(tasks, |task| {
        let base = &base;
        let (start, end) = (
            task * rows_per_task,
            ((task + 1) * rows_per_task).min(out_features),
        );
        let mut state = scratch();
        let mut dst = vec![0.0f32; span * row_block];
        let mut line = vec![0.0f32; span];
        for block in (0..n).step_by(row_block) {
            let rows = block..(block + row_block).min(n);
            let m = rows.len();
            for from in (start..end).step_by(span) {
                let columns = span.min(end - from);
                for first in (from..from + columns).step_by(tile) {
                    let count = tile.min(from + columns - first);
                    let at = (first - from) * m;
                    tile_dots(
                        &mut state,
                        first,
                        rows.clone(),
                        &mut dst[at..at + count * m],
                    );
                }
                for j in 0..m {
                    for (c, v) in line[..columns].iter_mut().enumerate() {
                        *v = dst[c * m + j];
                    }
                    // SAFETY: row `block + j`, columns `from..from + columns`, are inside
                    // `out`, and each task writes only its own columns while `out` stays
                    // mutably borrowed.
                    unsafe {
                        let to = base.0.add((block + j) * out_features + from);
                        std::ptr::copy_nonoverlapping(line.as_ptr(), to, columns);
                    }
                }
            }
        }
    });
}

/// Dot product, using the widest vectors the CPU has. The summation order depends only on
/// the lengths, so results are reproducible run to run.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            return unsafe { dot_avx512(a, b) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_body::<false, 16>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    dot_body::<true, 32>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_body::<true, 32>(a, b)
}

/// `LANES` (a power of two) independent accumulators keep two vector FMA chains in flight
/// for the target's vector width; `FMA` selects fused multiply-add, which is only fast where
/// the target has it.
#[inline(always)]
pub(super) fn dot_body<const FMA: bool, const LANES: usize>(
    a: &[f32],
    b: &[impl KvElement],
) -> f32 {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let mut acc = [0.0f32; LANES];
    let (a_chunks, a_tail) = a.as_chunks::<LANES>();
    let (b_chunks, b_tail) = b.as_chunks::<LANES>();
    for (ac, bc) in a_chunks.iter().zip(b_chunks) {
        for j in 0..LANES {
            acc[j] = multiply_add::<FMA>(ac[j], bc[j].widen(), acc[j]);
        }
    }
    // Halve the accumulators pairwise: the first halvings are whole-vector adds, where a
    // running sum over the lanes would be one dependent scalar add per lane.
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for j in 0..width {
            acc[j] += acc[j + width];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y.widen()).sum();
    tail + acc[0]
}

/// `a · b + c`, fused where `FMA`.
#[inline(always)]
pub(super) fn multiply_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    match FMA {
        true => a.mul_add(b, c),
        false => c + a * b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::weights::{DType, Weight};

    fn naive(x: &Matrix, w: &[f32], out_f: usize) -> Vec<f32> {
        let k = x.cols;
        let mut out = vec![0.0; x.rows * out_f];
        for i in 0..x.rows {
            for o in 0..out_f {
                out[i * out_f + o] = (0..k).map(|j| x.row(i)[j] * w[o * k + j]).sum();
            }
        }
        out
    }

    #[test]
    fn linear_matches_naive_for_gemv_and_gemm_in_every_dtype() {
        let (out_f, k) = (300, 1030);
        let wf = crate::backend::test_values(out_f * k, 1);
        for rows in [1, 3, 17] {
            let x = Matrix::from_vec(
                rows,
                k,
                crate::backend::test_values(rows * k, 2 + rows as u32),
            );
            let expected = naive(&x, &wf, out_f);
            let f32w = Weight::from_f32(&wf, vec![out_f, k]);
            let got = linear(&x, &f32w);
            assert!(max_err(&got.data, &expected) < 1e-3, "f32 rows={rows}");
            for dtype in [DType::BF16, DType::F16] {
                let (bytes, rounded): (Vec<[u8; 2]>, Vec<f32>) = wf
                    .iter()
                    .map(|v| match dtype {
                        DType::BF16 => {
                            let h = half::bf16::from_f32(*v);
                            (h.to_le_bytes(), h.to_f32())
                        }
                        _ => {
                            let h = half::f16::from_f32(*v);
                            (h.to_le_bytes(), h.to_f32())
                        }
                    })
                    .unzip();
                let weight = Weight::from_bytes(bytes.concat(), dtype, vec![out_f, k]);
                let expected = naive(&x, &rounded, out_f);
                let got = linear(&x, &weight);
                assert!(max_err(&got.data, &expected) < 1e-3, "{dtype} rows={rows}");
            }
        }
    }

    fn max_err(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }
}
