//! Quantized weights repacked at load for the integer matrix-vector kernels: each row's quants
//! contiguous, 8-bit ones in the grouped layout of [`QuantizedRow`], 4-bit ones as GGUF packs a
//! Q4_0 block (whose nibbles line up with that layout by construction), and the scales (per
//! block or per half block) and minimums in arrays of their own. A group of four blocks then
//! takes two 64-byte multiply-accumulates (AVX-512 VNNI) or four 32-byte ones (AVX2).
//! GGUF's Q4_0, Q4_1 and Q4_K (4-bit), Q8_0, Q5_0, Q5_1 and Q5_K (8-bit), Q2_K, Q3_K and Q6_K
//! (8-bit with half-block scales and minimums) repack without changing a single weight.

use half::f16;

use super::{grouped_index, half_index, QuantizedRow, BLOCK, GROUP};
use crate::backend::cpu::kernels;
use crate::backend::tensor::Matrix;
use crate::backend::Linear;
use crate::io::blocks::KBlock;
use crate::io::weights::{DType, Weight, WeightData};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bits {
    Eight,
    Four,
}

/// Per-block (or half-block) scales or minimums: f16 where the source stores them so (GGUF's
/// 32-element types), else f32 (vibee's quantizers, and the K-quants' `d · sc`, computed once
/// at load as llama.cpp computes it: decoding super-block factors in the kernel costs more
/// than the bytes it saves, measured on Q4_K_M).
enum Numbers {
    Half(Vec<f16>),
    Full(Vec<f32>),
}

impl Numbers {
    fn get(&self, i: usize) -> f32 {
        match self {
            Numbers::Half(v) => v[i].to_f32(),
            Numbers::Full(v) => v[i],
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Numbers::Half(v) => 2 * v.len(),
            Numbers::Full(v) => 4 * v.len(),
        }
    }
}

/// A `[rows, cols]` weight of 32-element blocks: `weight = scale · (q + offset) + min`.
pub struct PackedMatrix {
    bits: Bits,
    rows: usize,
    cols: usize,
    /// Eight bits: signed values, each row in the grouped layout. Four bits: unsigned nibbles,
    /// per block 16 bytes holding element `j` in the low and `j + 16` in the high nibble of
    /// byte `j`, blocks in order.
    quants: Vec<u8>,
    /// One per block, row-major; or, with `halves`, one per half block, each row's in the
    /// order of [`half_index`].
    scales: Numbers,
    halves: bool,
    /// For asymmetric formats, laid out as `scales`.
    mins: Option<Numbers>,
    /// Added to every quant: −8 for symmetric 4-bit blocks, else 0.
    offset: f32,
}

impl PackedMatrix {
    /// A GGUF weight of a block-quantized type, repacked; `None` for float types.
    pub fn from_gguf(weight: &Weight) -> Option<Self> {
        let WeightData::Blocks(data) = weight.data() else {
            return None;
        };
        let (bits, offset) = match weight.dtype {
            DType::Q8_0
            | DType::Q5_0
            | DType::Q5_1
            | DType::Q2K
            | DType::Q3K
            | DType::Q5K
            | DType::Q6K => (Bits::Eight, 0.0),
            DType::Q4_0 => (Bits::Four, -8.0),
            DType::Q4_1 | DType::Q4K => (Bits::Four, 0.0),
            _ => return None,
        };
        let (rows, cols) = (weight.shape[0], weight.shape[1]);
        let blocks = cols / BLOCK;
        let halves = matches!(weight.dtype, DType::Q2K | DType::Q3K | DType::Q6K);
        let mut packed = Self::empty(bits, rows, cols, halves, offset);
        let (per_block, block_bytes) = weight.dtype.block();
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]);
        if per_block == BLOCK {
            let mut scales = Vec::with_capacity(rows * blocks);
            let mut mins = Vec::new();
            let mut values = [0i8; BLOCK];
            for (i, block) in data.chunks_exact(block_bytes).enumerate() {
                crate::io::blocks::unpack(weight.dtype, block, &mut values);
                scales.push(half(block));
                if matches!(weight.dtype, DType::Q4_1 | DType::Q5_1) {
                    mins.push(half(&block[2..]));
                }
                // 8-bit storage keeps the signed values (Q5_0's already centred); Q4_0 keeps
                // its unsigned nibbles and the offset.
                values.iter_mut().for_each(|v| *v -= offset as i8);
                packed.set_quants(i / blocks, i % blocks, &values);
            }
            packed.scales = Numbers::Half(scales);
            packed.mins = (!mins.is_empty()).then_some(Numbers::Half(mins));
            return Some(packed);
        }
        // K-quants: a scale and a minimum per run of 32 elements (of 16 for Q2_K, Q3_K, Q6_K).
        let entries = rows * blocks * if halves { 2 } else { 1 };
        let (mut scales, mut mins) = (vec![0.0; entries], vec![0.0; entries]);
        for (i, block) in data.chunks_exact(block_bytes).enumerate() {
            let k = KBlock::new(weight.dtype, block);
            let first = i * per_block / BLOCK;
            let (r, b) = (first / blocks, first % blocks);
            for j in 0..per_block / BLOCK {
                let quants: [i8; BLOCK] = k.quants[j * BLOCK..(j + 1) * BLOCK]
                    .try_into()
                    .expect("a block");
                packed.set_quants(r, b + j, &quants);
                if halves {
                    for h in 0..2 {
                        let at = 2 * r * blocks + half_index(blocks, b + j, h);
                        (scales[at], mins[at]) = (k.scale(2 * j + h), k.min(2 * j + h));
                    }
                } else {
                    let at = r * blocks + b + j;
                    (scales[at], mins[at]) = (k.scale(j), k.min(j));
                }
            }
        }
        packed.scales = Numbers::Full(scales);
        if matches!(weight.dtype, DType::Q2K | DType::Q4K | DType::Q5K) {
            packed.mins = Some(Numbers::Full(mins));
        }
        Some(packed)
    }

    /// `weight` quantized a row at a time (rows in parallel): `quantize_row(r, values,
    /// blocks)` turns row `r`'s f32 values into its blocks. `asymmetric` formats keep a minimum per
    /// block; 4-bit quants are unsigned (0–15), 8-bit ones signed.
    pub fn quantize(
        weight: &Weight,
        bits: Bits,
        asymmetric: bool,
        quantize_row: impl Fn(usize, &[f32], &mut [QuantBlock]) + Sync,
    ) -> Self {
        let (rows, cols) = (weight.shape[0], weight.shape[1]);
        Self::from_blocks(bits, rows, cols, asymmetric, |r, blocks| {
            let mut values = vec![0.0; cols];
            weight.row_to_f32(r, &mut values);
            quantize_row(r, &values, blocks);
        })
    }

    /// A `[rows, cols]` matrix whose row `r` `row_blocks(r, blocks)` writes (rows in
    /// parallel), block by block; quants as for [`PackedMatrix::quantize`].
    pub fn from_blocks(
        bits: Bits,
        rows: usize,
        cols: usize,
        asymmetric: bool,
        row_blocks: impl Fn(usize, &mut [QuantBlock]) + Sync,
    ) -> Self {
        use rayon::prelude::*;
        let blocks = cols / BLOCK;
        let mut packed = Self::empty(bits, rows, cols, false, 0.0);
        let (mut scales, mut mins) = (Vec::with_capacity(rows * blocks), Vec::new());
        // A few hundred rows at a time bound the memory of the intermediate blocks.
        for first in (0..rows).step_by(256) {
            let chunk: Vec<Vec<QuantBlock>> = (first..rows.min(first + 256))
                .into_par_iter()
                .map(|r| {
                    let mut row = vec![QuantBlock::default(); blocks];
                    row_blocks(r, &mut row);
                    row
                })
                .collect();
            for (i, row) in chunk.iter().enumerate() {
                for (b, block) in row.iter().enumerate() {
                    packed.set_quants(first + i, b, &block.quants);
                    scales.push(block.scale);
                    if asymmetric {
                        mins.push(block.min);
                    }
                }
            }
        }
        packed.scales = Numbers::Full(scales);
        packed.mins = asymmetric.then_some(Numbers::Full(mins));
        packed
    }

    /// The same matrix with its scales stored as f16, for formats whose scales are f16 values
    /// (exact): fewer bytes for the kernels to stream. Minimums stay f32, since `−scale · zero`
    /// rounded to f16 moves whole blocks of weights.
    pub fn with_half_scales(mut self) -> Self {
        if let Numbers::Full(values) = &self.scales {
            self.scales = Numbers::Half(values.iter().map(|v| f16::from_f32(*v)).collect());
        }
        self
    }

    /// The rows of `parts` one after another (q, k and v; gate and up), so one product serves
    /// them all: one quantization of the activations and one parallel section, and each
    /// element computed as in its own matrix. `None` when the parts are not packed alike.
    pub fn stack(parts: Vec<PackedMatrix>) -> Option<Self> {
        let first = parts.first()?;
        let numbers_alike = |a: &Numbers, b: &Numbers| {
            matches!(
                (a, b),
                (Numbers::Half(_), Numbers::Half(_)) | (Numbers::Full(_), Numbers::Full(_))
            )
        };
        let alike = parts.iter().all(|p| {
            p.bits == first.bits
                && p.cols == first.cols
                && p.halves == first.halves
                && p.offset == first.offset
                && numbers_alike(&p.scales, &first.scales)
                && match (&p.mins, &first.mins) {
                    (None, None) => true,
                    (Some(a), Some(b)) => numbers_alike(a, b),
                    _ => false,
                }
        });
        if !alike {
            return None;
        }
        let concat = |all: Vec<&Numbers>| match all[0] {
            Numbers::Half(_) => Numbers::Half(
                all.iter()
                    .flat_map(|n| match n {
                        Numbers::Half(v) => v.clone(),
                        Numbers::Full(_) => unreachable!("checked alike"),
                    })
                    .collect(),
            ),
            Numbers::Full(_) => Numbers::Full(
                all.iter()
                    .flat_map(|n| match n {
                        Numbers::Full(v) => v.clone(),
                        Numbers::Half(_) => unreachable!("checked alike"),
                    })
                    .collect(),
            ),
        };
        Some(Self {
            bits: first.bits,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            quants: parts
                .iter()
                .flat_map(|p| p.quants.iter().copied())
                .collect(),
            scales: concat(parts.iter().map(|p| &p.scales).collect()),
            halves: first.halves,
            mins: first
                .mins
                .as_ref()
                .map(|_| concat(parts.iter().filter_map(|p| p.mins.as_ref()).collect())),
            offset: first.offset,
        })
    }

    /// A matrix with zeroed quants, whose scales and minimums the constructor fills in.
    fn empty(bits: Bits, rows: usize, cols: usize, halves: bool, offset: f32) -> Self {
        Self {
            bits,
            rows,
            cols,
            quants: vec![0; rows * Self::row_bytes(bits, cols)],
            scales: Numbers::Full(Vec::new()),
            halves,
            mins: None,
            offset,
        }
    }

    /// Stores block `b` of row `r`'s quants as the format keeps them (before the offset).
    fn set_quants(&mut self, r: usize, b: usize, quants: &[i8; BLOCK]) {
        let blocks = self.blocks();
        let len = Self::row_bytes(self.bits, self.cols);
        let row = &mut self.quants[r * len..(r + 1) * len];
        match self.bits {
            Bits::Eight => {
                for (i, q) in quants.iter().enumerate() {
                    row[grouped_index(blocks, b, i)] = *q as u8;
                }
            }
            Bits::Four => {
                for j in 0..16 {
                    row[b * 16 + j] = quants[j] as u8 | (quants[j + 16] as u8) << 4;
                }
            }
        }
    }

    /// Where the scale and minimum of half `h` of block `b` of row `r` are.
    fn entry(&self, r: usize, b: usize, h: usize) -> usize {
        let blocks = self.blocks();
        if self.halves {
            2 * r * blocks + half_index(blocks, b, h)
        } else {
            r * blocks + b
        }
    }

    fn scale(&self, r: usize, b: usize, h: usize) -> f32 {
        self.scales.get(self.entry(r, b, h))
    }

    fn min(&self, r: usize, b: usize, h: usize) -> f32 {
        self.mins
            .as_ref()
            .map_or(0.0, |m| m.get(self.entry(r, b, h)))
    }

    fn row_bytes(bits: Bits, cols: usize) -> usize {
        match bits {
            Bits::Eight => cols,
            Bits::Four => cols / 2,
        }
    }

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    fn row_quants(&self, r: usize) -> &[u8] {
        let len = Self::row_bytes(self.bits, self.cols);
        &self.quants[r * len..(r + 1) * len]
    }

    /// Element `i` of block `b` of row `r`, as stored (before offset and scale).
    fn quant(&self, r: usize, b: usize, i: usize) -> i32 {
        let row = self.row_quants(r);
        match self.bits {
            Bits::Eight => row[grouped_index(self.blocks(), b, i)] as i8 as i32,
            Bits::Four => {
                let byte = row[b * 16 + i % 16];
                (if i < 16 { byte & 0x0F } else { byte >> 4 }) as i32
            }
        }
    }

    /// Row `r` widened to f32.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
            let scales = [self.scale(r, b, 0), self.scale(r, b, 1)];
            let mins = [self.min(r, b, 0), self.min(r, b, 1)];
            for (i, o) in out.iter_mut().enumerate() {
                let q = self.quant(r, b, i) as f32 + self.offset;
                *o = scales[i / 16] * q + mins[i / 16];
            }
        }
    }

    /// The dot product of row `r` with a quantized activation row.
    pub fn dot(&self, r: usize, x: &QuantizedRow) -> f32 {
        // The kernels read whole rows of blocks: a mismatch would read past a buffer.
        assert_eq!(x.blocks(), self.blocks(), "dot: the activation row's width");
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = x86::Kernel::detect() {
            // SAFETY: the kernel's features were detected; the row and `x` hold
            // `self.blocks()` blocks each, which is all the kernels read.
            return unsafe { kernel.dot::<1, 1>(self, r, [x]) }[0][0];
        }
        self.dot_blocks(r, x, 0..self.blocks())
    }

    /// The dot products of weight rows `first..` (as many as `out` holds rows of `xs.len()`)
    /// with every row of `xs`, into `out`, one weight row after another. A tile of
    /// [`TILE_ROWS`] weight rows × several activation rows shares each load of either, which
    /// makes the integer kernels worth running for prompts of any length; every dot product
    /// is computed the same way whatever tile it falls in.
    pub fn dot_rows(&self, first: usize, xs: &[QuantizedRow], out: &mut [f32]) {
        let n = xs.len();
        // The kernels read whole rows of blocks: a mismatch would read past a buffer.
        assert!(
            n > 0 && out.len().is_multiple_of(n) && first + out.len() / n <= self.rows,
            "dot_rows: shapes disagree"
        );
        assert!(
            xs.iter().all(|x| x.blocks() == self.blocks()),
            "dot_rows: activation rows do not match the weight's width"
        );
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = x86::Kernel::detect() {
            // Decode (one activation row, or a few) streams one weight row at a time: two
            // streams measured 18% slower there.
            let tiled = if n >= 4 {
                out.len() / n / TILE_ROWS * TILE_ROWS
            } else {
                0
            };
            let (tiles, rows) = out.split_at_mut(tiled * n);
            for (t, tile) in tiles.chunks_exact_mut(TILE_ROWS * n).enumerate() {
                // SAFETY: as in `dot`; the rows exist (checked above).
                unsafe { self.tile::<TILE_ROWS>(kernel, first + t * TILE_ROWS, xs, tile) };
            }
            for (j, row) in rows.chunks_exact_mut(n).enumerate() {
                // SAFETY: as above.
                unsafe { self.tile::<1>(kernel, first + tiled + j, xs, row) };
            }
            return;
        }
        for (j, row) in out.chunks_exact_mut(n).enumerate() {
            for (x, o) in xs.iter().zip(row) {
                *o = self.dot(first + j, x);
            }
        }
    }

    /// Weight rows `first..first + R` with every row of `xs`: eight activation rows at a time
    /// (with AVX2's 16 registers too: its spills cost less than the unpacks they save,
    /// measured +17% prefill over four), then four, then one.
    ///
    /// # Safety
    /// `kernel`'s features must be present, the rows must exist and `xs` must be as wide as
    /// they are.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn tile<const R: usize>(
        &self,
        kernel: x86::Kernel,
        first: usize,
        xs: &[QuantizedRow],
        out: &mut [f32],
    ) {
        let done = self.columns::<R, 8>(kernel, first, xs, 0, out);
        let done = self.columns::<R, 4>(kernel, first, xs, done, out);
        self.columns::<R, 1>(kernel, first, xs, done, out);
    }

    /// Weight rows `first..first + R` with the activation rows from `start`, `N` at a time, as
    /// many as fit; returns where it stopped.
    ///
    /// # Safety
    /// As for [`Self::tile`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn columns<const R: usize, const N: usize>(
        &self,
        kernel: x86::Kernel,
        first: usize,
        xs: &[QuantizedRow],
        start: usize,
        out: &mut [f32],
    ) -> usize {
        let n = xs.len();
        let chunks = xs[start..].chunks_exact(N);
        let end = n - chunks.remainder().len();
        for (c, x) in chunks.enumerate() {
            let dots = kernel.dot::<R, N>(self, first, std::array::from_fn(|i| &x[i]));
            let at = start + c * N;
            for (j, row) in dots.iter().enumerate() {
                out[j * n + at..j * n + at + N].copy_from_slice(row);
            }
        }
        end
    }

    /// The part of the dot product of row `r` over `blocks`, one element at a time.
    fn dot_blocks(&self, r: usize, x: &QuantizedRow, blocks: std::ops::Range<usize>) -> f32 {
        let mut total = 0.0;
        for b in blocks {
            let quants = x.block(b);
            for h in 0..2 {
                let range = 16 * h..16 * (h + 1);
                let products: i32 = range.map(|i| self.quant(r, b, i) * quants[i] as i32).sum();
                let (d, min) = (self.scale(r, b, h), self.min(r, b, h));
                let half_sum = x.half_sums[half_index(x.blocks(), b, h)];
                total += d * x.scales[b] * products as f32 + (self.offset * d + min) * half_sum;
            }
        }
        total
    }
}

/// Weight rows per tile of the AVX-512 kernel.
const TILE_ROWS: usize = 2;

/// One quantized block of 32 weights: `weight = scale · quant + min`.
#[derive(Clone, Copy, Debug, Default)]
pub struct QuantBlock {
    pub quants: [i8; BLOCK],
    pub scale: f32,
    pub min: f32,
}

/// A linear layer over a packed weight.
pub struct PackedLinear(pub PackedMatrix);

impl PackedLinear {
    /// `x · Wᵀ` on the integer kernels.
    fn integer(&self, x: &Matrix, out: &mut Matrix) {
        let quantized = super::quantize_rows(x);
        // Activation rows take about a byte an element.
        let row_block = (kernels::ROW_BLOCK_BYTES / x.cols.max(1)).next_multiple_of(8);
        kernels::gemv_rows(
            out,
            TILE_ROWS,
            row_block,
            || (),
            |_, first, rows, dst| self.0.dot_rows(first, &quantized[rows], dst),
        );
    }
}

impl Linear for PackedLinear {
    /// Activations are rounded to int8 per block of 32 for any number of rows, as llama.cpp
    /// does, and every product takes the integer kernels, whose per-element sums do not depend
    /// on the tile: a token's result does not depend on how many rows share its product.
    fn forward(&self, x: &Matrix) -> Matrix {
        let w = &self.0;
        assert_eq!(x.cols, w.cols, "linear: input width does not match weight");
        let mut out = Matrix::zeros(x.rows, w.rows);
        self.integer(x, &mut out);
        out
    }

    fn weight_bytes(&self) -> usize {
        let w = &self.0;
        w.quants.len() + w.scales.bytes() + w.mins.as_ref().map_or(0, Numbers::bytes)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Bits, Numbers, PackedMatrix, QuantizedRow, BLOCK, GROUP};

    /// The integer kernels the host runs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Kernel {
        Avx512,
        Avx2,
    }

    impl Kernel {
        pub fn detect() -> Option<Self> {
            let avx2 = std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c");
            let avx512 = avx2
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx512vnni");
            match (avx512, avx2) {
                (true, _) => Some(Kernel::Avx512),
                (false, true) => Some(Kernel::Avx2),
                _ => None,
            }
        }

        /// # Safety
        /// The kernel's features must be present, rows `first..first + R` must exist, and
        /// `xs` must be as wide as they are.
        #[inline(always)]
        pub unsafe fn dot<const R: usize, const N: usize>(
            self,
            w: &PackedMatrix,
            first: usize,
            xs: [&QuantizedRow; N],
        ) -> [[f32; N]; R] {
            match self {
                Kernel::Avx512 => dot_avx512::<R, N>(w, first, xs),
                Kernel::Avx2 => dot_avx2::<R, N>(w, first, xs),
            }
        }
    }

    /// Entries `i..i + 4` (`i` a multiple of 4) as f32.
    #[inline(always)]
    unsafe fn load4(numbers: &Numbers, i: usize) -> __m128 {
        match numbers {
            Numbers::Half(v) => _mm_cvtph_ps(_mm_loadl_epi64(v.as_ptr().add(i).cast())),
            Numbers::Full(v) => _mm_loadu_ps(v.as_ptr().add(i)),
        }
    }

    #[inline(always)]
    unsafe fn hsum128(v: __m128) -> f32 {
        let pair = _mm_add_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
    }

    /// Dot products of `R` weight rows from `first` with `N` activation rows: each group of
    /// weights is loaded and unpacked, and its scales spread over the lanes, once for all
    /// activation rows, and each group of activations once for all weight rows. `vpdpbusd`
    /// multiplies unsigned by signed bytes: 8-bit weights keep their sign, moved onto the
    /// activations (`|w| · (x · sign w)`), which loses nothing; shifting them to unsigned
    /// instead and subtracting 128 · Σx after cancels away the precision of small weights
    /// (Q3_K's −4…3). The format's offset and minimums multiply only the activations' block
    /// sums, so they are one short dot product per weight row, for all activation rows at
    /// once, after the loop ([`offsets_avx512`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub unsafe fn dot_avx512<const R: usize, const N: usize>(
        w: &PackedMatrix,
        first: usize,
        xs: [&QuantizedRow; N],
    ) -> [[f32; N]; R] {
        // The layout is fixed per weight: a kernel for each keeps the inner loops free of
        // its branches.
        match (w.bits, w.halves) {
            (Bits::Four, false) => dot_layout::<R, N, true, false>(w, first, xs),
            (Bits::Four, true) => dot_layout::<R, N, true, true>(w, first, xs),
            (Bits::Eight, false) => dot_layout::<R, N, false, false>(w, first, xs),
            (Bits::Eight, true) => dot_layout::<R, N, false, true>(w, first, xs),
        }
    }

    /// [`dot_avx512`] for 4-bit (`FOUR`) or 8-bit weights, with or without half-block
    /// scales (`HALVES`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    #[inline]
    unsafe fn dot_layout<const R: usize, const N: usize, const FOUR: bool, const HALVES: bool>(
        w: &PackedMatrix,
        first: usize,
        xs: [&QuantizedRow; N],
    ) -> [[f32; N]; R] {
        let blocks = w.blocks();
        let groups = blocks / GROUP;
        let mut quants = [std::ptr::null(); R];
        for (j, q) in quants.iter_mut().enumerate() {
            *q = w.row_quants(first + j).as_ptr();
        }
        // Lane i of the products belongs to block i / 4 of the group.
        let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        let spread = |v: __m128| _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(v));
        let low = _mm512_set1_epi8(0x0F);
        let zero = _mm512_setzero_si512();
        let mut acc = [[_mm512_setzero_ps(); N]; R];
        for g in 0..groups {
            // Each row's weights as unsigned bytes, the lanes whose sign moves onto x, and the
            // scales of the blocks' first and second halves (the same unless the format has
            // half-block scales), spread.
            let mut rows = [(zero, zero, 0, 0, _mm512_setzero_ps(), _mm512_setzero_ps()); R];
            // A loop, not `std::array::from_fn`: a closure called from a function without
            // these target features is not inlined here, and its intrinsics became calls
            // (measured twice as slow).
            for (j, row) in rows.iter_mut().enumerate() {
                let (a, b, negative_a, negative_b) = match FOUR {
                    true => {
                        let packed = _mm512_loadu_si512(quants[j].add(64 * g).cast());
                        let high = _mm512_srli_epi16(packed, 4);
                        (
                            _mm512_and_si512(packed, low),
                            _mm512_and_si512(high, low),
                            0,
                            0,
                        )
                    }
                    false => {
                        let a = _mm512_loadu_si512(quants[j].add(128 * g).cast());
                        let b = _mm512_loadu_si512(quants[j].add(128 * g + 64).cast());
                        let (na, nb) = (_mm512_movepi8_mask(a), _mm512_movepi8_mask(b));
                        (_mm512_abs_epi8(a), _mm512_abs_epi8(b), na, nb)
                    }
                };
                let (da, db) = if HALVES {
                    let at = 2 * ((first + j) * blocks + g * GROUP);
                    (load4(&w.scales, at), load4(&w.scales, at + GROUP))
                } else {
                    let d = load4(&w.scales, (first + j) * blocks + g * GROUP);
                    (d, d)
                };
                *row = (a, b, negative_a, negative_b, spread(da), spread(db));
            }
            for k in 0..N {
                let xq = xs[k].quants.as_ptr().add(GROUP * BLOCK * g);
                let xa = _mm512_loadu_si512(xq.cast());
                let xb = _mm512_loadu_si512(xq.add(64).cast());
                let dx = _mm512_loadu_ps(xs[k].lane_scales.as_ptr().add(16 * g));
                for (j, &(a, b, negative_a, negative_b, da, db)) in rows.iter().enumerate() {
                    let (xa, xb) = match FOUR {
                        true => (xa, xb),
                        false => (
                            _mm512_mask_sub_epi8(xa, negative_a, zero, xa),
                            _mm512_mask_sub_epi8(xb, negative_b, zero, xb),
                        ),
                    };
                    let acc = &mut acc[j][k];
                    if HALVES {
                        let pa = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, a, xa));
                        let pb = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, b, xb));
                        *acc = _mm512_fmadd_ps(pa, _mm512_mul_ps(da, dx), *acc);
                        *acc = _mm512_fmadd_ps(pb, _mm512_mul_ps(db, dx), *acc);
                    } else {
                        let p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, a, xa), b, xb);
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(da, dx), *acc);
                    }
                }
            }
        }
        // Loops rather than `from_fn` closures, for the reason above.
        let mut dots = [[0.0; N]; R];
        for (j, row) in dots.iter_mut().enumerate() {
            let r = first + j;
            let offsets = offsets_avx512(w, r, xs, groups * GROUP);
            let rest = groups * GROUP..w.blocks();
            for (k, dot) in row.iter_mut().enumerate() {
                *dot = _mm512_reduce_add_ps(acc[j][k]) + offsets[k];
                if !rest.is_empty() {
                    *dot += w.dot_blocks(r, xs[k], rest.clone());
                }
            }
        }
        dots
    }

    /// `Σ (offset · d + min) · Σx` over the first `blocks` blocks of row `r` (or over their
    /// halves, for formats with half-block scales), for each of the activation rows `xs`: the
    /// part of the dot product the format's offset and minimums add, from the activations'
    /// block sums. Each run of 16 weight terms is computed once for all `N` rows.
    #[inline(always)]
    unsafe fn offsets_avx512<const N: usize>(
        w: &PackedMatrix,
        r: usize,
        xs: [&QuantizedRow; N],
        blocks: usize,
    ) -> [f32; N] {
        let mut totals = [0.0; N];
        let Some((first, count, sums)) = offset_terms(w, r, xs, blocks) else {
            return totals;
        };
        let shift = _mm512_set1_ps(w.offset);
        let mut acc = [_mm512_setzero_ps(); N];
        for i in (0..count).step_by(16) {
            let mask: __mmask16 = if count - i >= 16 {
                0xFFFF
            } else {
                (1 << (count - i)) - 1
            };
            let mut c = _mm512_mul_ps(load16(&w.scales, first + i, mask), shift);
            if let Some(mins) = &w.mins {
                c = _mm512_add_ps(c, load16(mins, first + i, mask));
            }
            for (a, s) in acc.iter_mut().zip(sums) {
                *a = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(mask, s.add(i)), *a);
            }
        }
        for (t, a) in totals.iter_mut().zip(acc) {
            *t = _mm512_reduce_add_ps(a);
        }
        totals
    }

    /// The first of row `r`'s offset terms over its first `blocks` blocks, how many there are,
    /// and where each activation row's matching sums start; `None` for a format with neither
    /// offset nor minimums. Scales, minimums and sums share one layout: per block, or per half
    /// in `half_index` order.
    #[inline(always)]
    fn offset_terms<const N: usize>(
        w: &PackedMatrix,
        r: usize,
        xs: [&QuantizedRow; N],
        blocks: usize,
    ) -> Option<(usize, usize, [*const f32; N])> {
        if w.offset == 0.0 && w.mins.is_none() {
            return None;
        }
        let per_block = if w.halves { 2 } else { 1 };
        let mut sums = [std::ptr::null(); N];
        for (s, x) in sums.iter_mut().zip(xs) {
            *s = if w.halves {
                x.half_sums.as_ptr()
            } else {
                x.sums.as_ptr()
            };
        }
        Some((per_block * r * w.blocks(), per_block * blocks, sums))
    }

    /// Entries `i..i + 16` as f32, those outside `mask` zero (and not read).
    #[inline(always)]
    unsafe fn load16(numbers: &Numbers, i: usize, mask: __mmask16) -> __m512 {
        match numbers {
            Numbers::Half(v) => {
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, v.as_ptr().add(i).cast()))
            }
            Numbers::Full(v) => _mm512_maskz_loadu_ps(mask, v.as_ptr().add(i)),
        }
    }

    /// Dot products of `R` weight rows from `first` with `N` activation rows, as
    /// [`dot_avx512`] computes them, in 256-bit halves: each weight group is unpacked and its
    /// scales spread once for all activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2<const R: usize, const N: usize>(
        w: &PackedMatrix,
        first: usize,
        xs: [&QuantizedRow; N],
    ) -> [[f32; N]; R] {
        match (w.bits, w.halves) {
            (Bits::Four, false) => layout_avx2::<R, N, true, false>(w, first, xs),
            (Bits::Four, true) => layout_avx2::<R, N, true, true>(w, first, xs),
            (Bits::Eight, false) => layout_avx2::<R, N, false, false>(w, first, xs),
            (Bits::Eight, true) => layout_avx2::<R, N, false, true>(w, first, xs),
        }
    }

    /// [`dot_avx2`] for 4-bit (`FOUR`) or 8-bit weights, with or without half-block scales
    /// (`HALVES`). Lanes 0–3 of a half's products belong to its first block, 4–7 to its
    /// second: the activations' lane scales line up with them as stored.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn layout_avx2<const R: usize, const N: usize, const FOUR: bool, const HALVES: bool>(
        w: &PackedMatrix,
        first: usize,
        xs: [&QuantizedRow; N],
    ) -> [[f32; N]; R] {
        let blocks = w.blocks();
        let groups = blocks / GROUP;
        let mut quants = [std::ptr::null(); R];
        for (j, q) in quants.iter_mut().enumerate() {
            *q = w.row_quants(first + j).as_ptr();
        }
        let spreads = [
            _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0),
            _mm256_set_epi32(3, 3, 3, 3, 2, 2, 2, 2),
        ];
        let low = _mm256_set1_epi8(0x0F);
        let zero = _mm256_setzero_si256();
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        for g in 0..groups {
            // Per row and half: the weights of the blocks' first and second halves, and
            // their scales spread over the lanes. Loops, not closures (see `dot_layout`).
            let mut rows = [[(zero, zero, _mm256_setzero_ps(), _mm256_setzero_ps()); 2]; R];
            for (j, row) in rows.iter_mut().enumerate() {
                let (da, db) = if HALVES {
                    let at = 2 * ((first + j) * blocks + g * GROUP);
                    (load4(&w.scales, at), load4(&w.scales, at + GROUP))
                } else {
                    let d = load4(&w.scales, (first + j) * blocks + g * GROUP);
                    (d, d)
                };
                let (da, db) = (_mm256_castps128_ps256(da), _mm256_castps128_ps256(db));
                for (half, entry) in row.iter_mut().enumerate() {
                    let (a, b) = match FOUR {
                        true => {
                            let packed =
                                _mm256_loadu_si256(quants[j].add(64 * g + 32 * half).cast());
                            (
                                _mm256_and_si256(packed, low),
                                _mm256_and_si256(_mm256_srli_epi16(packed, 4), low),
                            )
                        }
                        false => (
                            _mm256_loadu_si256(quants[j].add(128 * g + 32 * half).cast()),
                            _mm256_loadu_si256(quants[j].add(128 * g + 64 + 32 * half).cast()),
                        ),
                    };
                    let spread = spreads[half];
                    *entry = (
                        a,
                        b,
                        _mm256_permutevar8x32_ps(da, spread),
                        _mm256_permutevar8x32_ps(db, spread),
                    );
                }
            }
            for k in 0..N {
                let xq = xs[k].quants.as_ptr().add(GROUP * BLOCK * g);
                for half in 0..2 {
                    let xa = _mm256_loadu_si256(xq.add(32 * half).cast());
                    let xb = _mm256_loadu_si256(xq.add(64 + 32 * half).cast());
                    let dx = _mm256_loadu_ps(xs[k].lane_scales.as_ptr().add(16 * g + 8 * half));
                    for (j, row) in rows.iter().enumerate() {
                        let (a, b, da, db) = row[half];
                        let (pa, pb) = (products_avx2::<FOUR>(a, xa), products_avx2::<FOUR>(b, xb));
                        let acc = &mut acc[j][k];
                        if HALVES {
                            *acc = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(pa),
                                _mm256_mul_ps(da, dx),
                                *acc,
                            );
                            *acc = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(pb),
                                _mm256_mul_ps(db, dx),
                                *acc,
                            );
                        } else {
                            let p = _mm256_cvtepi32_ps(_mm256_add_epi32(pa, pb));
                            *acc = _mm256_fmadd_ps(p, _mm256_mul_ps(da, dx), *acc);
                        }
                    }
                }
            }
        }
        let mut dots = [[0.0; N]; R];
        for (j, row) in dots.iter_mut().enumerate() {
            let r = first + j;
            let offsets = offsets_avx2(w, r, xs, groups * GROUP);
            let rest = groups * GROUP..w.blocks();
            for (k, dot) in row.iter_mut().enumerate() {
                let quad = _mm_add_ps(
                    _mm256_castps256_ps128(acc[j][k]),
                    _mm256_extractf128_ps(acc[j][k], 1),
                );
                *dot = hsum128(quad) + offsets[k];
                if !rest.is_empty() {
                    *dot += w.dot_blocks(r, xs[k], rest.clone());
                }
            }
        }
        dots
    }

    /// Products of 32 weight bytes with 32 activation bytes, summed in groups of four into
    /// eight i32 lanes. `vpmaddubsw` saturates at 16 bits, so 8-bit weights keep their sign,
    /// moved onto the activations (`|w| · (x · sign w)`); 4-bit ones multiply directly.
    #[inline(always)]
    unsafe fn products_avx2<const FOUR: bool>(w: __m256i, x: __m256i) -> __m256i {
        let pairs = match FOUR {
            true => _mm256_maddubs_epi16(w, x),
            false => _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)),
        };
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    /// [`offsets_avx512`] eight terms at a time, then one at a time.
    #[inline(always)]
    unsafe fn offsets_avx2<const N: usize>(
        w: &PackedMatrix,
        r: usize,
        xs: [&QuantizedRow; N],
        blocks: usize,
    ) -> [f32; N] {
        let mut totals = [0.0; N];
        let Some((first, count, sums)) = offset_terms(w, r, xs, blocks) else {
            return totals;
        };
        let shift = _mm256_set1_ps(w.offset);
        let mut acc = [_mm256_setzero_ps(); N];
        let whole = count / 8 * 8;
        for i in (0..whole).step_by(8) {
            let mut c = _mm256_mul_ps(load8(&w.scales, first + i), shift);
            if let Some(mins) = &w.mins {
                c = _mm256_add_ps(c, load8(mins, first + i));
            }
            for (a, s) in acc.iter_mut().zip(sums) {
                *a = _mm256_fmadd_ps(c, _mm256_loadu_ps(s.add(i)), *a);
            }
        }
        for ((t, a), s) in totals.iter_mut().zip(acc).zip(sums) {
            let quad = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            *t = hsum128(quad);
            for i in whole..count {
                let mut c = w.scales.get(first + i) * w.offset;
                if let Some(mins) = &w.mins {
                    c += mins.get(first + i);
                }
                *t = c.mul_add(*s.add(i), *t);
            }
        }
        totals
    }

    /// Entries `i..i + 8` as f32.
    #[inline(always)]
    unsafe fn load8(numbers: &Numbers, i: usize) -> __m256 {
        match numbers {
            Numbers::Half(v) => _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i).cast())),
            Numbers::Full(v) => _mm256_loadu_ps(v.as_ptr().add(i)),
        }
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::io::blocks::{dequantize, quantize_q4_0, quantize_q8_0};

    /// Reproducible values in [−1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let halves = crate::backend::test_values(n, seed);
        halves.iter().map(|v| 2.0 * v).collect()
    }

    /// A Q4_1 weight from values, by its definition (min and range per block).
    fn quantize_q4_1(values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for block in values.chunks_exact(BLOCK) {
            let min = block.iter().copied().fold(f32::INFINITY, f32::min);
            let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
            let q = |v: f32| (((v - min) / d).round() as u8).min(15);
            out.extend((0..16).map(|j| q(block[j]) | q(block[j + 16]) << 4));
        }
        out
    }

    #[test]
    fn packed_rows_widen_and_multiply_as_their_gguf_blocks() {
        // 11 blocks per row: two whole groups of four and a tail of three.
        let (rows, cols) = (5, 11 * BLOCK);
        let w = values(rows * cols, 3);
        let x = values(cols, 9);
        for (dtype, bytes) in [
            (DType::Q8_0, quantize_q8_0(&w)),
            (DType::Q4_0, quantize_q4_0(&w)),
            (DType::Q4_1, quantize_q4_1(&w)),
            (
                DType::Q5_0,
                random_blocks(DType::Q5_0, rows * cols / BLOCK, 13),
            ),
            (
                DType::Q5_1,
                random_blocks(DType::Q5_1, rows * cols / BLOCK, 17),
            ),
        ] {
            check_packed(dtype, bytes, rows, &x);
        }
    }

    /// A packed weight widens to exactly GGUF's dequantization of `bytes`, and its dot products
    /// with `x` agree between the portable, the detected SIMD and the AVX2 paths, within the
    /// activations' rounding of the exact product.
    fn check_packed(dtype: DType, bytes: Vec<u8>, rows: usize, x: &[f32]) {
        let cols = x.len();
        let quantized = QuantizedRow::new(x);
        let mut expected = vec![0.0; rows * cols];
        dequantize(dtype, &bytes, &mut expected);
        let packed =
            PackedMatrix::from_gguf(&Weight::from_bytes(bytes, dtype, vec![rows, cols])).unwrap();
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            packed.row_to_f32(r, &mut row);
            assert_eq!(row, expected[r * cols..(r + 1) * cols], "{dtype} row {r}");
            let reference = packed.dot_blocks(r, &quantized, 0..cols / BLOCK);
            assert_within_rounding(&row, x, &quantized, reference, dtype);
            let simd = packed.dot(r, &quantized);
            assert!(
                (simd - reference).abs() <= 1e-5 * reference.abs().max(1.0),
                "{dtype} row {r}: {simd} vs {reference}"
            );
            #[cfg(target_arch = "x86_64")]
            if x86::Kernel::detect().is_some() {
                // SAFETY: every kernel detected implies AVX2, FMA and F16C.
                let avx2 = unsafe { x86::dot_avx2::<1, 1>(&packed, r, [&quantized]) }[0][0];
                assert!((avx2 - reference).abs() <= 1e-5 * reference.abs().max(1.0));
            }
        }
    }

    /// Random blocks with moderate finite f16 scales (and minimums).
    fn random_blocks(dtype: DType, count: usize, seed: u32) -> Vec<u8> {
        let (_, block_bytes) = dtype.block();
        let noise = values(count * block_bytes, seed);
        let mut bytes: Vec<u8> = noise.iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
        for (i, block) in bytes.chunks_exact_mut(block_bytes).enumerate() {
            let scale = f16::from_f32(0.01 + 0.001 * i as f32).to_le_bytes();
            let at: &[usize] = match dtype {
                DType::Q2K => &[80, 82],
                DType::Q6K => &[208],
                DType::Q3K => &[108],
                DType::Q5_0 => &[0],
                _ => &[0, 2],
            };
            for a in at {
                block[*a..*a + 2].copy_from_slice(&scale);
            }
        }
        bytes
    }

    #[test]
    fn k_quants_repack_exactly_and_multiply_as_widened() {
        let (rows, cols) = (3, 512);
        let x = values(cols, 5);
        for dtype in [DType::Q2K, DType::Q3K, DType::Q4K, DType::Q5K, DType::Q6K] {
            check_packed(dtype, random_blocks(dtype, rows * cols / 256, 21), rows, &x);
        }
    }

    #[test]
    fn stacked_matrices_give_each_part_its_own_products() {
        let cols = 8 * BLOCK;
        let part = |rows: usize, seed| {
            let bytes = quantize_q4_0(&values(rows * cols, seed));
            PackedMatrix::from_gguf(&Weight::from_bytes(bytes, DType::Q4_0, vec![rows, cols]))
                .unwrap()
        };
        let x = Matrix::from_vec(5, cols, values(5 * cols, 9));
        let (gate, up) = (PackedLinear(part(7, 1)), PackedLinear(part(3, 2)));
        let both = PackedLinear(PackedMatrix::stack(vec![part(7, 1), part(3, 2)]).unwrap());
        let (g, u, b) = (gate.forward(&x), up.forward(&x), both.forward(&x));
        for r in 0..5 {
            assert_eq!(&b.row(r)[..7], g.row(r));
            assert_eq!(&b.row(r)[7..], u.row(r));
        }
        let q8 = quantize_q8_0(&values(2 * cols, 3));
        let eight = PackedMatrix::from_gguf(&Weight::from_bytes(q8, DType::Q8_0, vec![2, cols]));
        assert!(PackedMatrix::stack(vec![part(2, 4), eight.unwrap()]).is_none());
    }

    #[test]
    fn many_rows_give_each_row_its_own_result() {
        // An odd number of weight rows leaves one outside the tiles of two; 30 activation rows
        // run as 3 × 8 + 4 + 1 + 1; 11 blocks per row leave 3 outside the groups of four (the
        // 32-element types; K-quant rows are whole super-blocks). Offsets (Q4_0), minimums
        // (Q4_1, Q4_K, Q2_K) and half-block scales (Q6_K, Q2_K) all take the tiled path.
        let rows = 41;
        for (dtype, cols) in [
            (DType::Q4_0, 11 * BLOCK),
            (DType::Q4_1, 11 * BLOCK),
            (DType::Q8_0, 11 * BLOCK),
            (DType::Q4K, 256),
            (DType::Q2K, 256),
            (DType::Q6K, 256),
        ] {
            let bytes = match dtype {
                DType::Q4_0 => quantize_q4_0(&values(rows * cols, 4)),
                DType::Q8_0 => quantize_q8_0(&values(rows * cols, 6)),
                _ => random_blocks(dtype, rows * cols / dtype.block().0, 7),
            };
            // 800 rows of Q4_0 span two blocks of activation rows.
            let n = if dtype == DType::Q4_0 { 800 } else { 30 };
            let x = Matrix::from_vec(n, cols, values(n * cols, 8));
            let weight = Weight::from_bytes(bytes, dtype, vec![rows, cols]);
            let linear = PackedLinear(PackedMatrix::from_gguf(&weight).unwrap());
            // The tiles of weight × activation rows against the one-row path, bit for bit.
            let many = linear.forward(&x);
            for (j, row) in x.rows_iter().enumerate() {
                let one = linear.forward(&Matrix::from_vec(1, cols, row.to_vec()));
                assert_eq!(many.row(j), one.row(0), "{dtype} row {j}");
            }
        }
    }

    /// `got` is the dot product of `row` and `x` up to the rounding of the activations: each
    /// moves by at most half its block's step.
    fn assert_within_rounding(row: &[f32], x: &[f32], q: &QuantizedRow, got: f32, dtype: DType) {
        let exact: f32 = row.iter().zip(x).map(|(w, x)| w * x).sum();
        let bound: f32 = row
            .chunks_exact(BLOCK)
            .zip(&q.scales)
            .map(|(w, s)| s / 2.0 * w.iter().map(|v| v.abs()).sum::<f32>())
            .sum();
        assert!(
            (got - exact).abs() <= bound * 1.001 + 1e-4,
            "{dtype}: {got} vs {exact} (bound {bound})"
        );
    }
}
