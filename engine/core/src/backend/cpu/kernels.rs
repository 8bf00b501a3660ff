//! CPU kernels: the reference backend, and a real target.
//!
//! `linear` multiplies activations by a weight stored as `[out, in]` (the Hugging Face layout)
//! in f32, f16, bf16 or a quantized block type, reading the weight in place. Decode (one or a
//! few rows) runs a SIMD dot-product GEMV split over threads by output rows (integer dot
//! products for quantized weights); prefill runs a tuned GEMM over weights widened to f32 a
//! block of rows at a time.

use rayon::prelude::*;

use crate::backend::cpu::pool;
use crate::backend::quant;
use crate::backend::tensor::Matrix;
use crate::io::weights::{Weight, WeightData};

/// Up to this many activation rows, a row-parallel GEMV beats GEMM: it streams the weight once.
pub const GEMV_MAX_ROWS: usize = 4;
/// Output rows converted to f32 per GEMM block for f16/bf16 weights.
const GEMM_BLOCK_ROWS: usize = 128;
/// Elements of a half-precision weight row converted per step in the GEMV.
const CONVERT_CHUNK: usize = 512;

/// `x · Wᵀ`: `x` is `[n, in]`, `w` is `[out, in]`; returns `[n, out]`.
pub fn linear(x: &Matrix, w: &Weight) -> Matrix {
    let (out_features, in_features) = (w.shape[0], w.shape[1]);
    assert_eq!(
        x.cols, in_features,
        "linear: input width does not match weight"
    );
    let mut out = Matrix::zeros(x.rows, out_features);
    // As in the packed kernels, quantized weights see activations rounded to int8 per block.
    let rounded;
    let x = if w.dtype.is_quantized() {
        rounded = quant::round_activations(x);
        &rounded
    } else {
        x
    };
    if x.rows <= GEMV_MAX_ROWS {
        gemv(x, w, &mut out);
    } else {
        gemm_blocks(x, w, &mut out);
    }
    out
}

fn gemv(x: &Matrix, w: &Weight, out: &mut Matrix) {
    let k = w.shape[1];
    let data = w.data();
    let row_bytes = w.dtype.bytes_for(k).expect("weight rows are whole blocks");
    let scratch = || ([0.0f32; CONVERT_CHUNK], Vec::new());
    gemv_rows(out, 1, scratch, |(buf, dequantized), row, dst| {
        let range = row * k..(row + 1) * k;
        match data {
            WeightData::F32(w) => dot_rows(&w[range], x, dst),
            WeightData::BF16(w) => dot_rows(&w[range], x, dst),
            WeightData::F16(w) => dot_converted(&w[range], x, dst, buf),
            WeightData::Blocks(blocks) => {
                let bytes = &blocks[row * row_bytes..(row + 1) * row_bytes];
                dequantized.resize(k, 0.0);
                crate::io::blocks::dequantize(w.dtype, bytes, dequantized);
                dot_rows(dequantized, x, dst);
            }
        }
    });
}

/// A matrix-vector product (or a few) split over threads by output rows, `tile` weight rows at
/// a time: `tile_dots(state, first, dst)` writes the products of the `dst.len() / n` weight
/// rows from `first` (`tile`, or fewer at the end) with each of the `n` activation rows into
/// `dst`, one weight row after another; each thread has its own `state` from `scratch`.
pub fn gemv_rows<S>(
    out: &mut Matrix,
    tile: usize,
    scratch: impl Fn() -> S + Sync,
    tile_dots: impl Fn(&mut S, usize, &mut [f32]) + Sync,
) {
    let (n, out_features) = (out.rows, out.cols);
    // Results are computed transposed (one weight row serves every activation row) and
    // scattered after, so each thread writes a disjoint slice.
    let mut transposed = vec![0.0f32; out_features * n];
    // One contiguous block of rows per thread: each streams its part of the weight in order.
    let rows_per_task = out_features
        .div_ceil(pool::pool().threads())
        .next_multiple_of(tile);
    pool::pool().for_each_chunk(&mut transposed, rows_per_task * n, |task, chunk| {
        let first = task * rows_per_task;
        let mut state = scratch();
        for (t, dst) in chunk.chunks_mut(tile * n).enumerate() {
            tile_dots(&mut state, first + t * tile, dst);
        }
    });
    for (row, values) in transposed.chunks_exact(n).enumerate() {
        for (j, v) in values.iter().enumerate() {
            out.data[j * out_features + row] = *v;
        }
    }
}

/// Dot products of one weight row with every row of `x`.
fn dot_rows<T: Widen>(w: &[T], x: &Matrix, dst: &mut [f32]) {
    for (j, d) in dst.iter_mut().enumerate() {
        *d = dot_stream(w, x.row(j));
    }
}

/// Dot products of one f16 weight row with every row of `x`, converting the weight a
/// cache-sized chunk at a time (F16C converts in bulk; there is no cheap per-lane widening).
fn dot_converted(w: &[half::f16], x: &Matrix, dst: &mut [f32], buf: &mut [f32; CONVERT_CHUNK]) {
    dst.fill(0.0);
    for (c, chunk) in w.chunks(CONVERT_CHUNK).enumerate() {
        let buf = &mut buf[..chunk.len()];
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(chunk, buf);
        let offset = c * CONVERT_CHUNK;
        for (j, d) in dst.iter_mut().enumerate() {
            *d += dot(buf, &x.row(j)[offset..offset + buf.len()]);
        }
    }
}

fn gemm_blocks(x: &Matrix, w: &Weight, out: &mut Matrix) {
    let (out_features, k) = (w.shape[0], w.shape[1]);
    let n = x.rows;
    match w.data() {
        WeightData::F32(data) => {
            // SAFETY: the slices hold n×k, out×k and n×out elements with the strides given.
            unsafe {
                gemm_f32(
                    n,
                    out_features,
                    k,
                    &x.data,
                    data,
                    &mut out.data,
                    out_features,
                    true,
                )
            };
        }
        _ => gemm_widened(x, out, |r, row| w.row_to_f32(r, row)),
    }
}

/// `out = x · Wᵀ` for a weight whose rows `widen(r, row)` converts to f32: each block of
/// output rows is converted and multiplied on its own thread; the results land in a
/// block-major buffer and are scattered into `out`.
pub fn gemm_widened(x: &Matrix, out: &mut Matrix, widen: impl Fn(usize, &mut [f32]) + Sync) {
    let (n, out_features, k) = (x.rows, out.cols, x.cols);
    let blocks = out_features.div_ceil(GEMM_BLOCK_ROWS);
    let mut scratch = vec![0.0f32; blocks * GEMM_BLOCK_ROWS * n];
    scratch
        .par_chunks_mut(GEMM_BLOCK_ROWS * n)
        .enumerate()
        .for_each(|(b, dst)| {
            let first = b * GEMM_BLOCK_ROWS;
            let rows = GEMM_BLOCK_ROWS.min(out_features - first);
            let mut block = vec![0.0f32; rows * k];
            for (r, row) in block.chunks_exact_mut(k).enumerate() {
                widen(first + r, row);
            }
            // SAFETY: `block` is rows×k, `dst` holds n×rows with row stride `rows`.
            unsafe { gemm_f32(n, rows, k, &x.data, &block, dst, rows, false) };
        });
    for (b, dst) in scratch.chunks_exact(GEMM_BLOCK_ROWS * n).enumerate() {
        let first = b * GEMM_BLOCK_ROWS;
        let rows = GEMM_BLOCK_ROWS.min(out_features - first);
        for i in 0..n {
            out.row_mut(i)[first..first + rows].copy_from_slice(&dst[i * rows..(i + 1) * rows]);
        }
    }
}

/// `dst[n, m] = lhs[n, k] · rhs[m, k]ᵀ` with `dst` row stride `dst_stride`.
///
/// # Safety
/// The slices must hold at least the elements the shapes and strides address.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32(
    n: usize,
    m: usize,
    k: usize,
    lhs: &[f32],
    rhs: &[f32],
    dst: &mut [f32],
    dst_stride: usize,
    threaded: bool,
) {
    debug_assert!(
        lhs.len() >= n * k && rhs.len() >= m * k && dst.len() >= (n - 1) * dst_stride + m
    );
    let parallelism = if threaded && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        n,
        m,
        k,
        dst.as_mut_ptr(),
        1,
        dst_stride as isize,
        false,
        lhs.as_ptr(),
        1,
        k as isize,
        rhs.as_ptr(),
        k as isize,
        1,
        0.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

/// A stored weight element that widens to f32 in a vector register.
pub trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for half::bf16 {
    /// bf16 is the top half of an f32, so widening is a shift the compiler vectorises.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// Dot product, using the widest vectors the CPU has. The summation order depends only on
/// the lengths, so results are reproducible run to run.
#[inline]
pub fn dot<T: Widen>(a: &[T], b: &[f32]) -> f32 {
    dispatch::<T, false>(a, b)
}

/// Dot product of a weight row streamed from memory with activations: the vector loop starts
/// at a cache-line boundary of the weight. A vector load that straddles two cache lines costs
/// two, and safetensors data is only 8-byte aligned (measured: 15–20% of decode bandwidth).
/// Deterministic for a given weight, since weights do not move.
#[inline]
fn dot_stream<T: Widen>(w: &[T], x: &[f32]) -> f32 {
    dispatch::<T, true>(w, x)
}

#[inline]
fn dispatch<T: Widen, const ALIGN: bool>(w: &[T], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            return unsafe { dot_avx512::<T, ALIGN>(w, x) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { dot_avx2::<T, ALIGN>(w, x) };
        }
    }
    dot_body::<T, false, ALIGN, 16>(w, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512<T: Widen, const ALIGN: bool>(w: &[T], x: &[f32]) -> f32 {
    dot_body::<T, true, ALIGN, 32>(w, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2<T: Widen, const ALIGN: bool>(w: &[T], x: &[f32]) -> f32 {
    dot_body::<T, true, ALIGN, 32>(w, x)
}

/// `LANES` independent accumulators keep two vector FMA chains in flight for the target's
/// vector width; `FMA` selects fused multiply-add, which is only fast where the target has it;
/// `ALIGN` runs a scalar head until `w` reaches a cache-line boundary.
#[inline(always)]
fn dot_body<T: Widen, const FMA: bool, const ALIGN: bool, const LANES: usize>(
    w: &[T],
    x: &[f32],
) -> f32 {
    let len = w.len().min(x.len());
    let head = if ALIGN {
        w.as_ptr().align_offset(64).min(len)
    } else {
        0
    };
    let mut sum: f32 = w[..head]
        .iter()
        .zip(&x[..head])
        .map(|(a, b)| a.widen() * b)
        .sum();
    let (w, x) = (&w[head..len], &x[head..len]);
    let mut acc = [0.0f32; LANES];
    let (w_chunks, w_tail) = w.as_chunks::<LANES>();
    let (x_chunks, x_tail) = x.as_chunks::<LANES>();
    for (wc, xc) in w_chunks.iter().zip(x_chunks) {
        for j in 0..LANES {
            let wj = wc[j].widen();
            acc[j] = if FMA {
                wj.mul_add(xc[j], acc[j])
            } else {
                acc[j] + wj * xc[j]
            };
        }
    }
    sum += w_tail
        .iter()
        .zip(x_tail)
        .map(|(a, b)| a.widen() * b)
        .sum::<f32>();
    sum + acc.iter().sum::<f32>()
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

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn linear_matches_naive_for_gemv_and_gemm_in_every_dtype() {
        let (out_f, k) = (300, 1030);
        let wf = pseudo_random(out_f * k, 1);
        for rows in [1, 3, 17] {
            let x = Matrix::from_vec(rows, k, pseudo_random(rows * k, 2 + rows as u32));
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
