//! `x · Wᵀ` whose every output element is one dot product computed the same way however many
//! activation rows share the product: each element accumulates its own vector lanes in input
//! order and reduces them in one fixed order, and tiles only decide how many elements run side
//! by side. So a token's result does not depend on its batch-mates or on where a prefill chunk
//! ends (batch invariance), and decode and prefill are one kernel.
//!
//! Tiles are `ROWS` activation rows × `COLS` weight rows: each weight vector loaded serves four
//! activation rows and each activation vector four weight rows, which keeps the FMA units busy
//! once the weight is in cache (prefill) and streams it once at one row (decode).

use std::array::from_fn;
use std::ops::Range;

use crate::backend::tensor::Matrix;

/// Activation rows per tile.
const ROWS: usize = 4;
/// Weight rows per tile.
const COLS: usize = 4;

/// Where the weight rows of a product come from.
pub enum WeightRows<'a> {
    F32(&'a [f32]),
    BF16(&'a [half::bf16]),
    F16(&'a [half::f16]),
    /// Rows that `widen(r, row)` converts to f32 first (quantized blocks).
    Widened(&'a (dyn Fn(usize, &mut [f32]) + Sync)),
}

/// `out = x · Wᵀ` for `out.cols` weight rows of `x.cols` elements each.
pub fn product(x: &Matrix, rows: WeightRows<'_>, out: &mut Matrix) {
    let k = x.cols;
    let scratch = || vec![0.0f32; COLS * k];
    let row_block = (super::kernels::ROW_BLOCK_BYTES / (4 * k.max(1))).next_multiple_of(ROWS);
    super::kernels::gemv_rows(
        out,
        COLS,
        row_block,
        scratch,
        |widened, first, block, dst| {
            let count = dst.len() / block.len();
            match &rows {
                WeightRows::F32(w) => {
                    tile_rows(x, block, |c| &w[(first + c) * k..][..k], count, dst)
                }
                WeightRows::BF16(w) => {
                    tile_rows(x, block, |c| &w[(first + c) * k..][..k], count, dst)
                }
                WeightRows::F16(w) => {
                    tile_rows(x, block, |c| &w[(first + c) * k..][..k], count, dst)
                }
                WeightRows::Widened(widen) => {
                    for (c, row) in widened.chunks_exact_mut(k).take(count).enumerate() {
                        widen(first + c, row);
                    }
                    tile_rows(x, block, |c| &widened[c * k..][..k], count, dst);
                }
            }
        },
    );
}

/// The dot products of `count` weight rows (`row(c)`) with rows `block` of `x`, into `dst`,
/// one weight row after another.
fn tile_rows<'w, T: Element + 'w>(
    x: &Matrix,
    block: Range<usize>,
    row: impl Fn(usize) -> &'w [T],
    count: usize,
    dst: &mut [f32],
) {
    let n = block.len();
    // The lanes of an element start where its weight row is aligned to a whole vector; rows
    // aligned alike share a tile (all of them, unless a row's length is odd).
    let head = |c: usize| row(c).as_ptr().align_offset(T::VECTOR_BYTES).min(x.cols);
    let shared = (0..count).all(|c| head(c) == head(0));
    let columns = if count == COLS && shared { COLS } else { 1 };
    for first in (0..count).step_by(columns) {
        let h = head(first);
        let mut r = 0;
        while r < n {
            let rows = if n - r >= ROWS { ROWS } else { 1 };
            let xs = |i: usize| x.row(block.start + r + i);
            let ws = |c: usize| row(first + c);
            let mut results = [[0.0f32; COLS]; ROWS];
            let out = &mut results;
            match (rows, columns) {
                (ROWS, COLS) => tile::<T, ROWS, COLS>(from_fn(xs), from_fn(ws), h, out),
                (ROWS, _) => tile::<T, ROWS, 1>(from_fn(xs), from_fn(ws), h, out),
                (_, COLS) => tile::<T, 1, COLS>(from_fn(xs), from_fn(ws), h, out),
                _ => tile::<T, 1, 1>(from_fn(xs), from_fn(ws), h, out),
            }
            for (i, result) in results.iter().take(rows).enumerate() {
                for (c, v) in result.iter().take(columns).enumerate() {
                    dst[(first + c) * n + r + i] = *v;
                }
            }
            r += rows;
        }
    }
}

/// A weight element the kernels read.
pub trait Element: Copy + Send + Sync {
    /// Bytes of one vector of weight elements (16 lanes).
    const VECTOR_BYTES: usize;
    /// IEEE half precision, which the vector kernels convert with F16C.
    const IEEE_HALF: bool = false;
    fn widen(self) -> f32;
}

impl Element for f32 {
    const VECTOR_BYTES: usize = 64;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Element for half::bf16 {
    const VECTOR_BYTES: usize = 32;
    /// bf16 is the top half of an f32.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Element for half::f16 {
    const VECTOR_BYTES: usize = 32;
    const IEEE_HALF: bool = true;
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// One tile on the widest kernel the CPU has. Each host takes one path for every product, so
/// results are the same for any tile shape on that host.
#[inline(always)]
fn tile<T: Element, const R: usize, const C: usize>(
    xs: [&[f32]; R],
    ws: [&[T]; C],
    head: usize,
    out: &mut [[f32; COLS]; ROWS],
) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY (both): the features were just detected; every row is `xs[0].len()` long.
        if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") {
            return unsafe { x86::tile_avx512::<T, R, C>(xs, ws, head, out) };
        }
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return unsafe { x86::tile_avx2::<T, R, C>(xs, ws, head, out) };
        }
    }
    tile_portable::<T, R, C>(xs, ws, head, out);
}

/// Lanes per element accumulator of the portable kernel.
const PORTABLE_LANES: usize = 8;

/// The portable kernel: per element, a scalar head up to the weight's alignment, lanes of
/// [`PORTABLE_LANES`] in input order, a scalar tail, then the lanes in order.
#[inline(always)]
fn tile_portable<T: Element, const R: usize, const C: usize>(
    xs: [&[f32]; R],
    ws: [&[T]; C],
    head: usize,
    out: &mut [[f32; COLS]; ROWS],
) {
    let len = xs[0].len();
    let body = head + (len - head) / PORTABLE_LANES * PORTABLE_LANES;
    for (r, x) in xs.iter().enumerate() {
        for (c, w) in ws.iter().enumerate() {
            let mut sum = 0.0f32;
            for i in 0..head {
                sum += w[i].widen() * x[i];
            }
            let mut lanes = [0.0f32; PORTABLE_LANES];
            for start in (head..body).step_by(PORTABLE_LANES) {
                for (j, lane) in lanes.iter_mut().enumerate() {
                    *lane += w[start + j].widen() * x[start + j];
                }
            }
            for i in body..len {
                sum += w[i].widen() * x[i];
            }
            out[r][c] = lanes.iter().fold(sum, |s, l| s + l);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Element, COLS, ROWS};

    /// Sixteen weight elements widened to f32 lanes; `mask` picks the lanes read.
    ///
    /// # Safety
    /// AVX-512F/BW/VL; the lanes `mask` picks must be inside the row.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn load_weights<T: Element>(w: *const T, mask: __mmask16) -> __m512 {
        if size_of::<T>() == 4 {
            _mm512_maskz_loadu_ps(mask, w.cast())
        } else if T::IEEE_HALF {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, w.cast()))
        } else {
            let halves = _mm256_maskz_loadu_epi16(mask, w.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16))
        }
    }

    /// Eight weight elements widened to f32 lanes.
    ///
    /// # Safety
    /// AVX2 and F16C; eight elements from `w` must be inside the row.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn load_weights8<T: Element>(w: *const T) -> __m256 {
        if size_of::<T>() == 4 {
            _mm256_loadu_ps(w.cast())
        } else if T::IEEE_HALF {
            _mm256_cvtph_ps(_mm_loadu_si128(w.cast()))
        } else {
            let halves = _mm_loadu_si128(w.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16))
        }
    }

    /// A tile of four activation rows by four weight rows would need twenty of AVX2's sixteen
    /// vector registers (sixteen sums, four weight vectors) and spill its sums every step: it
    /// runs as two tiles of two weight rows, each activation vector loaded once per pair.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be present and every row `xs[0].len()` long.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_avx2<T: Element, const R: usize, const C: usize>(
        xs: [&[f32]; R],
        ws: [&[T]; C],
        head: usize,
        out: &mut [[f32; COLS]; ROWS],
    ) {
        if R * C + C > 16 && C.is_multiple_of(2) {
            for pair in (0..C).step_by(2) {
                columns_avx2::<T, R, 2>(xs, [ws[pair], ws[pair + 1]], head, out, pair);
            }
        } else {
            columns_avx2::<T, R, C>(xs, ws, head, out, 0);
        }
    }

    /// Per element: the head (up to the weight's alignment) and the tail one product at a
    /// time, eight lanes at a time in input order between them, the lanes summed in order;
    /// weight row `c` of the tile is column `first + c` of `out`.
    ///
    /// # Safety
    /// As for [`tile_avx2`].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn columns_avx2<T: Element, const R: usize, const C: usize>(
        xs: [&[f32]; R],
        ws: [&[T]; C],
        head: usize,
        out: &mut [[f32; COLS]; ROWS],
        first: usize,
    ) {
        let len = xs[0].len();
        let body = head + (len - head) / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for start in (head..body).step_by(8) {
            let mut wv = [_mm256_setzero_ps(); C];
            for c in 0..C {
                wv[c] = load_weights8(ws[c].as_ptr().add(start));
            }
            for r in 0..R {
                let xv = _mm256_loadu_ps(xs[r].as_ptr().add(start));
                for c in 0..C {
                    acc[r][c] = _mm256_fmadd_ps(wv[c], xv, acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                let (x, w) = (xs[r], ws[c]);
                let mut sum = 0.0f32;
                for i in (0..head).chain(body..len) {
                    sum = w[i].widen().mul_add(x[i], sum);
                }
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r][c]);
                out[r][first + c] = lanes.iter().fold(sum, |s, l| s + l);
            }
        }
    }

    /// Sixteen lanes (those of `mask`) from `start` of every element of the tile.
    ///
    /// # Safety
    /// As for [`tile_avx512`]; the lanes of `mask` from `start` are inside the rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    #[inline]
    unsafe fn step<T: Element, const R: usize, const C: usize>(
        acc: &mut [[__m512; C]; R],
        xs: &[&[f32]; R],
        ws: &[&[T]; C],
        start: usize,
        mask: __mmask16,
    ) {
        let wv: [__m512; C] =
            std::array::from_fn(|c| load_weights(ws[c].as_ptr().add(start), mask));
        for r in 0..R {
            let xv = _mm512_maskz_loadu_ps(mask, xs[r].as_ptr().add(start));
            for c in 0..C {
                acc[r][c] = _mm512_fmadd_ps(wv[c], xv, acc[r][c]);
            }
        }
    }

    /// Per element: the head (up to the weight's alignment) in the low lanes of one masked
    /// vector, then sixteen lanes at a time in input order, the tail masked, and the lanes
    /// reduced by one fixed tree.
    ///
    /// # Safety
    /// AVX-512F must be present and every row `xs[0].len()` long.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn tile_avx512<T: Element, const R: usize, const C: usize>(
        xs: [&[f32]; R],
        ws: [&[T]; C],
        head: usize,
        out: &mut [[f32; COLS]; ROWS],
    ) {
        let len = xs[0].len();
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut start = 0;
        if head > 0 {
            step(&mut acc, &xs, &ws, 0, ((1u32 << head) - 1) as u16);
            start = head;
        }
        while start + 16 <= len {
            step(&mut acc, &xs, &ws, start, u16::MAX);
            start += 16;
        }
        if start < len {
            step(
                &mut acc,
                &xs,
                &ws,
                start,
                ((1u32 << (len - start)) - 1) as u16,
            );
        }
        for r in 0..R {
            for c in 0..C {
                out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_values as values;

    /// Every row's results are bit-identical whichever rows share the product, for f32, bf16
    /// and f16 weights at every alignment and widths that leave heads and tails.
    #[test]
    fn each_row_is_the_same_alone_or_with_others() {
        // 140 rows of 2048 span five blocks of activation rows.
        let shapes = [
            (37, 100, 0, 11),
            (9, 1030, 3, 11),
            (12, 64, 1, 11),
            (5, 7, 2, 11),
        ];
        for (out_features, k, offset, n) in shapes.into_iter().chain([(6, 2048, 0, 140)]) {
            let storage = values(out_features * k + offset, 1);
            let brains: Vec<half::bf16> =
                storage.iter().map(|v| half::bf16::from_f32(*v)).collect();
            let ieee: Vec<half::f16> = storage.iter().map(|v| half::f16::from_f32(*v)).collect();
            let f32s = &storage[offset..];
            let (bf16s, f16s) = (&brains[offset..], &ieee[offset..]);
            let x = Matrix::from_vec(n, k, values(n * k, 2));
            for dtype in ["f32", "bf16", "f16"] {
                let rows = || match dtype {
                    "f32" => WeightRows::F32(f32s),
                    "bf16" => WeightRows::BF16(bf16s),
                    _ => WeightRows::F16(f16s),
                };
                let mut all = Matrix::zeros(n, out_features);
                product(&x, rows(), &mut all);
                for i in 0..n {
                    let mut one = Matrix::zeros(1, out_features);
                    product(&x.rows_range(i..i + 1), rows(), &mut one);
                    assert_eq!(
                        one.row(0),
                        all.row(i),
                        "{dtype} row {i}, k {k}, offset {offset}"
                    );
                    for (o, v) in one.row(0).iter().enumerate() {
                        let w = |j: usize| match dtype {
                            "f32" => f32s[o * k + j] as f64,
                            "bf16" => bf16s[o * k + j].to_f64(),
                            _ => f16s[o * k + j].to_f64(),
                        };
                        let exact: f64 = (0..k).map(|j| w(j) * x.row(i)[j] as f64).sum();
                        assert!((*v as f64 - exact).abs() < 1e-4, "value");
                    }
                }
            }
        }
    }

    /// The narrower kernels this host does not pick: a 4×4 tile gives each element what a
    /// tile of one gives, near the exact dot product.
    #[test]
    fn the_avx2_and_portable_kernels_are_row_invariant_too() {
        let k = 203;
        let storage = values(4 * k + 3, 5);
        let x = values(4 * k, 6);
        let xs: [&[f32]; 4] = from_fn(|r| &x[r * k..(r + 1) * k]);
        let ws: [&[f32]; 4] = from_fn(|c| &storage[3 + c * k..3 + (c + 1) * k]);
        type Kernel<const R: usize, const C: usize> =
            fn([&[f32]; R], [&[f32]; C], usize, &mut [[f32; COLS]; ROWS]);
        let mut kernels: Vec<(Kernel<4, 4>, Kernel<1, 1>)> =
            vec![(tile_portable::<f32, 4, 4>, tile_portable::<f32, 1, 1>)];
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features were just detected; the rows are `k` long.
            kernels.push((
                |x, w, h, o| unsafe { x86::tile_avx2::<f32, 4, 4>(x, w, h, o) },
                |x, w, h, o| unsafe { x86::tile_avx2::<f32, 1, 1>(x, w, h, o) },
            ));
        }
        for (tiled, single) in kernels {
            for head in [0, 5] {
                let mut all = [[0.0; COLS]; ROWS];
                tiled(xs, ws, head, &mut all);
                for r in 0..4 {
                    for c in 0..4 {
                        let mut one = [[0.0; COLS]; ROWS];
                        single([xs[r]], [ws[c]], head, &mut one);
                        assert_eq!(one[0][0], all[r][c], "head {head}");
                        let exact: f64 = (0..k).map(|i| xs[r][i] as f64 * ws[c][i] as f64).sum();
                        assert!((all[r][c] as f64 - exact).abs() < 1e-4);
                    }
                }
            }
        }
    }
}
