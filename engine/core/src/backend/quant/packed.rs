//! Quantized weights repacked at load for the integer matrix-vector kernels: each row's quants
//! contiguous in the grouped layout of [`QuantizedRow`] (4-bit ones two to a byte, element `j`
//! of a block beside element `j + 16`, so that the nibbles line up with that layout), rows
//! padded with zero blocks to whole groups (or to a narrow last group, see [`RowLayout`]), and
//! the scales (per block or per half block) and minimums in arrays of their own, padded to whole
//! groups. A group of sixteen blocks then takes eight
//! 64-byte multiply-accumulates (AVX-512 VNNI) whose lanes are its blocks, and one conversion
//! and scaling of the sums per group instead of one per four blocks.
//! GGUF's Q4_0, Q4_1 and Q4_K (4-bit), Q8_0, Q5_0, Q5_1 and Q5_K (8-bit), Q2_K, Q3_K and Q6_K
//! (8-bit with half-block scales and minimums) repack without changing a single weight.

use half::f16;

use super::{groups, half_index, Lines, QuantizedRow, RowLayout, BLOCK, GROUP};
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
    quants: Lines,
    /// One per block, row-major; or, with `halves`, one per half block, each row's in the
    /// order of [`half_index`].
    scales: Numbers,
    halves: bool,
    /// For asymmetric formats, laid out as `scales`.
    mins: Option<Numbers>,
    /// Added to every quant: −8 for symmetric 4-bit blocks, else 0.
    offset: f32,
    /// Where each row's quants live, chosen at load as its activation rows' are.
    layout: RowLayout,
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
        let entries = rows * packed.entries_per_row();
        if per_block == BLOCK {
            let asymmetric = matches!(weight.dtype, DType::Q4_1 | DType::Q5_1);
            let mut scales = vec![f16::ZERO; entries];
            let mut mins = vec![f16::ZERO; if asymmetric { entries } else { 0 }];
            let mut values = [0i8; BLOCK];
            for (i, block) in data.chunks_exact(block_bytes).enumerate() {
                let (r, b) = (i / blocks, i % blocks);
                crate::io::blocks::unpack(weight.dtype, block, &mut values);
                let at = packed.entry(r, b, 0);
                scales[at] = half(block);
                if asymmetric {
                    mins[at] = half(&block[2..]);
                }
                // 8-bit storage keeps the signed values (Q5_0's already centred); Q4_0 keeps
                // its unsigned nibbles and the offset.
                values.iter_mut().for_each(|v| *v -= offset as i8);
                packed.set_quants(r, b, &values);
            }
            packed.scales = Numbers::Half(scales);
            packed.mins = asymmetric.then_some(Numbers::Half(mins));
            return Some(packed);
        }
        // K-quants: a scale and a minimum per run of 32 elements (of 16 for Q2_K, Q3_K, Q6_K).
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
                        let at = packed.entry(r, b + j, h);
                        (scales[at], mins[at]) = (k.scale(2 * j + h), k.min(2 * j + h));
                    }
                } else {
                    let at = packed.entry(r, b + j, 0);
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
        let entries = rows * packed.entries_per_row();
        let mut scales = vec![0.0; entries];
        let mut mins = vec![0.0; if asymmetric { entries } else { 0 }];
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
                    let at = packed.entry(first + i, b, 0);
                    scales[at] = block.scale;
                    if asymmetric {
                        mins[at] = block.min;
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
            quants: Lines::concat(parts.iter().map(|p| &p.quants[..])),
            scales: concat(parts.iter().map(|p| &p.scales).collect()),
            halves: first.halves,
            mins: first
                .mins
                .as_ref()
                .map(|_| concat(parts.iter().filter_map(|p| p.mins.as_ref()).collect())),
            offset: first.offset,
            layout: first.layout,
        })
    }

    /// A matrix with zeroed quants, whose scales and minimums the constructor fills in.
    fn empty(bits: Bits, rows: usize, cols: usize, halves: bool, offset: f32) -> Self {
        let layout = RowLayout::new(cols / BLOCK);
        Self {
            bits,
            rows,
            cols,
            quants: Lines::zeroed(rows * Self::row_bytes(bits, layout)),
            scales: Numbers::Full(Vec::new()),
            halves,
            mins: None,
            offset,
            layout,
        }
    }

    /// Stores block `b` of row `r`'s quants as the format keeps them (before the offset).
    fn set_quants(&mut self, r: usize, b: usize, quants: &[i8; BLOCK]) {
        let layout = self.layout;
        let len = Self::row_bytes(self.bits, layout);
        let row = &mut self.quants[r * len..(r + 1) * len];
        match self.bits {
            Bits::Eight => {
                for (i, q) in quants.iter().enumerate() {
                    row[layout.index(b, i)] = *q as u8;
                }
            }
            Bits::Four => {
                for j in 0..16 {
                    let byte = quants[j] as u8 | (quants[j + 16] as u8) << 4;
                    row[nibble_index(layout, b, j)] = byte;
                }
            }
        }
    }

    /// Where the scale and minimum of half `h` of block `b` of row `r` are.
    fn entry(&self, r: usize, b: usize, h: usize) -> usize {
        if self.halves {
            r * self.entries_per_row() + half_index(b, h)
        } else {
            r * self.entries_per_row() + b
        }
    }

    /// Scales (and minimums) per row, padding included.
    fn entries_per_row(&self) -> usize {
        let per_block = if self.halves { 2 } else { 1 };
        per_block * groups(self.blocks()) * GROUP
    }

    fn scale(&self, r: usize, b: usize, h: usize) -> f32 {
        self.scales.get(self.entry(r, b, h))
    }

    fn min(&self, r: usize, b: usize, h: usize) -> f32 {
        self.mins
            .as_ref()
            .map_or(0.0, |m| m.get(self.entry(r, b, h)))
    }

    fn row_bytes(bits: Bits, layout: RowLayout) -> usize {
        let padded = layout.elements();
        match bits {
            Bits::Eight => padded,
            Bits::Four => padded / 2,
        }
    }

    fn blocks(&self) -> usize {
        self.cols / BLOCK
    }

    fn row_quants(&self, r: usize) -> &[u8] {
        let len = Self::row_bytes(self.bits, self.layout);
        &self.quants[r * len..(r + 1) * len]
    }

    /// Element `i` of block `b` of row `r`, as stored (before offset and scale).
    fn quant(&self, r: usize, b: usize, i: usize) -> i32 {
        let (row, layout) = (self.row_quants(r), self.layout);
        match self.bits {
            Bits::Eight => row[layout.index(b, i)] as i8 as i32,
            Bits::Four => {
                let byte = row[nibble_index(layout, b, i % 16)];
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
            return unsafe { kernel.dot::<1>(self, r, [x]) }[0];
        }
        self.dot_blocks(r, x, 0..self.blocks())
    }

    /// The dot products of weight rows `first..` (as many as `out` holds rows of `xs.len()`)
    /// with every row of `xs`, into `out`, one weight row after another. Each weight row is
    /// unpacked once for several activation rows, which makes the integer kernels worth
    /// running for prompts of any length; every dot product is computed the same way whatever
    /// tile it falls in.
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
            // SAFETY: as in `dot`; the rows exist (checked above).
            unsafe { self.tile(kernel, first, xs, out) };
            return;
        }
        for (j, row) in out.chunks_exact_mut(n).enumerate() {
            for (x, o) in xs.iter().zip(row) {
                *o = self.dot(first + j, x);
            }
        }
    }

    /// Weight rows `first..` (as many as `out` holds) with every row of `xs`: eight activation
    /// rows at a time (with AVX2's 16 registers too: its spills cost less than the unpacks they
    /// save, measured +17% prefill over four), then four, then one.
    ///
    /// # Safety
    /// `kernel`'s features must be present, the rows must exist and `xs` must be as wide as
    /// they are.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn tile(&self, kernel: x86::Kernel, first: usize, xs: &[QuantizedRow], out: &mut [f32]) {
        let done = self.columns::<8>(kernel, first, xs, 0, out);
        let done = self.columns::<4>(kernel, first, xs, done, out);
        self.columns::<1>(kernel, first, xs, done, out);
    }

    /// Weight rows `first..` with the activation rows from `start`, `N` at a time, as many as
    /// fit; returns where it stopped. Each group of activation rows meets every weight row
    /// before the next group is read, so it is read from L1: weight row by weight row, a long
    /// prompt's activations (a quarter MB at 128 rows of 2048) streamed from L2 for each row,
    /// 64 bytes per `vpdpbusd`.
    ///
    /// # Safety
    /// As for [`Self::tile`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn columns<const N: usize>(
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
            let x: [&QuantizedRow; N] = std::array::from_fn(|i| &x[i]);
            for (j, row) in out.chunks_exact_mut(n).enumerate() {
                let dots = kernel.dot::<N>(self, first + j, x);
                row[start + c * N..start + (c + 1) * N].copy_from_slice(&dots);
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
                let half_sum = x.half_sums[half_index(b, h)];
                total += d * x.scales[b] * products as f32 + (self.offset * d + min) * half_sum;
            }
        }
        total
    }
}

/// Where the byte holding elements `j` and `j + 16` (`j < 16`) of block `b` lives in a row of
/// 4-bit weights: the grouped layout's place of element `j`, two elements to a byte.
#[inline(always)]
fn nibble_index(layout: RowLayout, b: usize, j: usize) -> usize {
    layout.index(b, j) - (b / GROUP) * GROUP * BLOCK / 2
}

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
        // Weight rows a call (each unpacked once for all the activation rows): sixteen for a
        // few activation rows (a call a row cost a fifth of a small model's decode in checks
        // and hand-offs, and more rows a call would leave a thread idle on narrow products);
        // sixty-four for a prompt, whose activations a call reads once from L2 for all of them.
        let rows_per_call = if x.rows < 8 { 16 } else { 64 };
        kernels::gemv_rows(
            out,
            rows_per_call,
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

    use super::{groups, Bits, Numbers, PackedMatrix, QuantizedRow, BLOCK, GROUP};
    use crate::backend::quant::STEP;

    /// The integer kernels the host runs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Kernel {
        Avx512,
        Avx2,
    }

    impl Kernel {
        /// Detected once: asked for every product.
        pub fn detect() -> Option<Self> {
            static KERNEL: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
            *KERNEL.get_or_init(Self::probe)
        }

        fn probe() -> Option<Self> {
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
        /// The kernel's features must be present, row `r` must exist, and `xs` must be as
        /// wide as it is.
        #[inline(always)]
        pub unsafe fn dot<const N: usize>(
            self,
            w: &PackedMatrix,
            r: usize,
            xs: [&QuantizedRow; N],
        ) -> [f32; N] {
            match self {
                Kernel::Avx512 => dot_avx512::<N>(w, r, xs),
                Kernel::Avx2 => dot_avx2::<N>(w, r, xs),
            }
        }
    }

    #[inline(always)]
    unsafe fn hsum128(v: __m128) -> f32 {
        let pair = _mm_add_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
    }

    /// Dot products of weight row `r` with `N` activation rows: each group of weights is
    /// loaded and unpacked once for all activation rows. `vpdpbusd` multiplies unsigned by
    /// signed bytes: 8-bit weights keep their sign, moved onto the activations
    /// (`|w| · (x · sign w)`), which loses nothing; shifting them to unsigned instead and
    /// subtracting 128 · Σx after cancels away the precision of small weights (Q3_K's −4…3).
    /// The format's offset and minimums multiply only the activations' block sums, so they are
    /// one short dot product for all activation rows at once, after the loop
    /// ([`offsets_avx512`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    pub unsafe fn dot_avx512<const N: usize>(
        w: &PackedMatrix,
        r: usize,
        xs: [&QuantizedRow; N],
    ) -> [f32; N] {
        // The layout is fixed per weight: a kernel for each keeps the inner loops free of
        // its branches.
        match (w.bits, w.halves) {
            (Bits::Four, false) => dot_layout::<N, true, false>(w, r, xs),
            (Bits::Four, true) => dot_layout::<N, true, true>(w, r, xs),
            (Bits::Eight, false) => dot_layout::<N, false, false>(w, r, xs),
            (Bits::Eight, true) => dot_layout::<N, false, true>(w, r, xs),
        }
    }

    /// [`dot_avx512`] for 4-bit (`FOUR`) or 8-bit weights, with or without half-block
    /// scales (`HALVES`), group by group.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma,f16c")]
    #[inline]
    unsafe fn dot_layout<const N: usize, const FOUR: bool, const HALVES: bool>(
        w: &PackedMatrix,
        r: usize,
        xs: [&QuantizedRow; N],
    ) -> [f32; N] {
        let mut acc = [_mm512_setzero_ps(); N];
        let wide = w.layout.wide_groups();
        for g in 0..wide {
            group_avx512::<N, FOUR, HALVES, false>(w, r, xs, g, &mut acc);
        }
        if wide < groups(w.blocks()) {
            group_avx512::<N, FOUR, HALVES, true>(w, r, xs, wide, &mut acc);
        }
        let mut dots = offsets_avx512(w, r, xs);
        for (dot, acc) in dots.iter_mut().zip(acc) {
            *dot += _mm512_reduce_add_ps(acc);
        }
        dots
    }

    /// Group `g` of row `r` into `acc`: the row's eight steps are unpacked once for all
    /// activation rows; each activation row's step then meets them in one multiply-accumulate
    /// each, sixteen blocks to a vector, and the group's sums are converted and scaled once.
    /// A `NARROW` group's steps are 32 bytes apart (see [`step512`]).
    #[inline(always)]
    unsafe fn group_avx512<
        const N: usize,
        const FOUR: bool,
        const HALVES: bool,
        const NARROW: bool,
    >(
        w: &PackedMatrix,
        r: usize,
        xs: [&QuantizedRow; N],
        g: usize,
        acc: &mut [__m512; N],
    ) {
        let stride = if NARROW {
            STEP * GROUP / 2
        } else {
            STEP * GROUP
        };
        let quants = w.row_quants(r).as_ptr();
        let low = _mm512_set1_epi8(0x0F);
        let zero = _mm512_setzero_si512();
        // The steps as unsigned bytes, the lanes whose sign moves onto x, and the scales of
        // the blocks' first and second halves (the same unless the format has half-block
        // scales). Loops, not `std::array::from_fn`: a closure called from a function without
        // these target features is not inlined here, and its intrinsics became calls
        // (measured twice as slow).
        let mut steps = [zero; 8];
        let mut negative = [0; 8];
        if FOUR {
            let group = quants.add(GROUP * BLOCK / 2 * g);
            for t in 0..4 {
                let packed = step512::<NARROW>(group.add(stride * t));
                steps[t] = _mm512_and_si512(packed, low);
                steps[t + 4] = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
            }
        } else {
            let group = quants.add(GROUP * BLOCK * g);
            for (s, (step, negative)) in steps.iter_mut().zip(&mut negative).enumerate() {
                let v = step512::<NARROW>(group.add(stride * s));
                *negative = _mm512_movepi8_mask(v);
                *step = _mm512_abs_epi8(v);
            }
        }
        let at = w.entry(r, GROUP * g, 0);
        let da = load16(&w.scales, at);
        let db = if HALVES {
            load16(&w.scales, at + GROUP)
        } else {
            da
        };
        for (x, acc) in xs.iter().zip(acc) {
            let xq = x.quants.as_ptr().add(GROUP * BLOCK * g);
            let dx = _mm512_loadu_ps(x.scales.as_ptr().add(GROUP * g));
            // Four chains of multiply-accumulates, not one: a chain of eight waits out eight
            // latencies (a single activation row ran at a third of the memory's speed).
            let mut sums = [zero; 4];
            for s in 0..8 {
                let mut x = step512::<NARROW>(xq.add(stride * s).cast());
                if !FOUR {
                    x = _mm512_mask_sub_epi8(x, negative[s], zero, x);
                }
                let chain = if HALVES { s / 4 * 2 + s % 2 } else { s % 4 };
                sums[chain] = _mm512_dpbusd_epi32(sums[chain], steps[s], x);
            }
            let (a, b) = (
                _mm512_add_epi32(sums[0], sums[1]),
                _mm512_add_epi32(sums[2], sums[3]),
            );
            if HALVES {
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(da, dx), *acc);
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(b), _mm512_mul_ps(db, dx), *acc);
            } else {
                let p = _mm512_cvtepi32_ps(_mm512_add_epi32(a, b));
                *acc = _mm512_fmadd_ps(p, _mm512_mul_ps(da, dx), *acc);
            }
        }
    }

    /// One step of a group: 64 bytes, or a narrow group's 32 in the low half with the rest
    /// zero (its blocks there are padding, with zero scales), never read past the row's end.
    #[inline(always)]
    unsafe fn step512<const NARROW: bool>(at: *const u8) -> __m512i {
        if NARROW {
            _mm512_zextsi256_si512(_mm256_loadu_si256(at.cast()))
        } else {
            _mm512_loadu_si512(at.cast())
        }
    }

    /// `Σ (offset · d + min) · Σx` over row `r`'s blocks (or over their halves, for formats
    /// with half-block scales), for each of the activation rows `xs`: the part of the dot
    /// product the format's offset and minimums add, from the activations' block sums. Each
    /// run of 16 weight terms is computed once for all `N` rows.
    #[inline(always)]
    unsafe fn offsets_avx512<const N: usize>(
        w: &PackedMatrix,
        r: usize,
        xs: [&QuantizedRow; N],
    ) -> [f32; N] {
        let mut totals = [0.0; N];
        let Some((first, count, sums)) = offset_terms(w, r, xs) else {
            return totals;
        };
        let shift = _mm512_set1_ps(w.offset);
        let mut acc = [_mm512_setzero_ps(); N];
        for i in (0..count).step_by(16) {
            let mut c = _mm512_mul_ps(load16(&w.scales, first + i), shift);
            if let Some(mins) = &w.mins {
                c = _mm512_add_ps(c, load16(mins, first + i));
            }
            for (a, s) in acc.iter_mut().zip(sums) {
                *a = _mm512_fmadd_ps(c, _mm512_loadu_ps(s.add(i)), *a);
            }
        }
        for (t, a) in totals.iter_mut().zip(acc) {
            *t = _mm512_reduce_add_ps(a);
        }
        totals
    }

    /// The first of row `r`'s offset terms, how many there are (whole groups: the padding's
    /// are zero), and where each activation row's matching sums start; `None` for a format
    /// with neither offset nor minimums. Scales, minimums and sums share one layout: per
    /// block, or per half in `half_index` order.
    #[inline(always)]
    fn offset_terms<const N: usize>(
        w: &PackedMatrix,
        r: usize,
        xs: [&QuantizedRow; N],
    ) -> Option<(usize, usize, [*const f32; N])> {
        if w.offset == 0.0 && w.mins.is_none() {
            return None;
        }
        let mut sums = [std::ptr::null(); N];
        for (s, x) in sums.iter_mut().zip(xs) {
            *s = if w.halves {
                x.half_sums.as_ptr()
            } else {
                x.sums.as_ptr()
            };
        }
        let count = w.entries_per_row();
        Some((r * count, count, sums))
    }

    /// Entries `i..i + 16` as f32.
    #[inline(always)]
    unsafe fn load16(numbers: &Numbers, i: usize) -> __m512 {
        match numbers {
            Numbers::Half(v) => _mm512_cvtph_ps(_mm256_loadu_si256(v.as_ptr().add(i).cast())),
            Numbers::Full(v) => _mm512_loadu_ps(v.as_ptr().add(i)),
        }
    }

    /// Dot products of weight row `r` with `N` activation rows, as [`dot_avx512`] computes
    /// them, in 256-bit halves: each half group is unpacked once for all activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2<const N: usize>(
        w: &PackedMatrix,
        r: usize,
        xs: [&QuantizedRow; N],
    ) -> [f32; N] {
        match (w.bits, w.halves) {
            (Bits::Four, false) => layout_avx2::<N, true, false>(w, r, xs),
            (Bits::Four, true) => layout_avx2::<N, true, true>(w, r, xs),
            (Bits::Eight, false) => layout_avx2::<N, false, false>(w, r, xs),
            (Bits::Eight, true) => layout_avx2::<N, false, true>(w, r, xs),
        }
    }

    /// [`dot_avx2`] for 4-bit (`FOUR`) or 8-bit weights, with or without half-block scales
    /// (`HALVES`): each group as two halves of eight blocks, one to a lane.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn layout_avx2<const N: usize, const FOUR: bool, const HALVES: bool>(
        w: &PackedMatrix,
        r: usize,
        xs: [&QuantizedRow; N],
    ) -> [f32; N] {
        let quants = w.row_quants(r).as_ptr();
        let low = _mm256_set1_epi8(0x0F);
        let zero = _mm256_setzero_si256();
        let mut acc = [_mm256_setzero_ps(); N];
        let layout = w.layout;
        for g in 0..groups(w.blocks()) {
            // A half group wholly of padding adds only zeros; a narrow group is one half.
            let halves = if GROUP * g + GROUP / 2 < w.blocks() {
                2
            } else {
                1
            };
            // Bytes from one step to the next.
            let stride = STEP * layout.width(g);
            for half in 0..halves {
                // The half group's eight steps and its blocks' scales. Loops, not closures
                // (see `dot_layout`).
                // 8-bit steps also keep their signs, moved onto each activation row.
                let mut steps = [zero; 8];
                let mut signs = [zero; 8];
                if FOUR {
                    let group = quants.add(GROUP * BLOCK / 2 * g + 32 * half);
                    for t in 0..4 {
                        let packed = _mm256_loadu_si256(group.add(stride * t).cast());
                        steps[t] = _mm256_and_si256(packed, low);
                        steps[t + 4] = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                    }
                } else {
                    let group = quants.add(GROUP * BLOCK * g + 32 * half);
                    for (s, (step, sign)) in steps.iter_mut().zip(&mut signs).enumerate() {
                        *sign = _mm256_loadu_si256(group.add(stride * s).cast());
                        *step = _mm256_sign_epi8(*sign, *sign);
                    }
                }
                let at = w.entry(r, GROUP * g, 0) + 8 * half;
                let da = load8(&w.scales, at);
                let db = if HALVES {
                    load8(&w.scales, at + GROUP)
                } else {
                    da
                };
                for (x, acc) in xs.iter().zip(&mut acc) {
                    let xq = x.quants.as_ptr().add(GROUP * BLOCK * g + 32 * half);
                    let dx = _mm256_loadu_ps(x.scales.as_ptr().add(GROUP * g + 8 * half));
                    let mut sums = [zero; 2];
                    for (s, (step, sign)) in steps.iter().zip(&signs).enumerate() {
                        let x = _mm256_loadu_si256(xq.add(stride * s).cast());
                        let h = if HALVES { s / 4 } else { 0 };
                        sums[h] = match FOUR {
                            true => _mm256_add_epi16(sums[h], _mm256_maddubs_epi16(*step, x)),
                            false => {
                                let pairs = _mm256_maddubs_epi16(*step, _mm256_sign_epi8(x, *sign));
                                _mm256_add_epi32(sums[h], widen_pairs(pairs))
                            }
                        };
                    }
                    if FOUR {
                        sums = [widen_pairs(sums[0]), widen_pairs(sums[1])];
                    }
                    let first_half = _mm256_cvtepi32_ps(sums[0]);
                    *acc = _mm256_fmadd_ps(first_half, _mm256_mul_ps(da, dx), *acc);
                    if HALVES {
                        let second = _mm256_cvtepi32_ps(sums[1]);
                        *acc = _mm256_fmadd_ps(second, _mm256_mul_ps(db, dx), *acc);
                    }
                }
            }
        }
        let mut dots = offsets_avx2(w, r, xs);
        for (dot, acc) in dots.iter_mut().zip(acc) {
            let quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
            *dot += hsum128(quad);
        }
        dots
    }

    /// Sums of adjacent pairs of 16-bit lanes, as 32-bit lanes. `vpmaddubsw` makes the pairs
    /// and saturates at 16 bits: 8-bit weights keep their sign, moved onto the activations
    /// (`|w| · (x · sign w)`), and are widened at once; the pairs of 4-bit ones (at most
    /// 2 · 15 · 128) are added in 16 bits over a whole half group first, eight steps to a sum
    /// of at most 30,720, and widened once.
    #[inline(always)]
    unsafe fn widen_pairs(pairs: __m256i) -> __m256i {
        _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
    }

    /// [`offsets_avx512`] eight terms at a time.
    #[inline(always)]
    unsafe fn offsets_avx2<const N: usize>(
        w: &PackedMatrix,
        r: usize,
        xs: [&QuantizedRow; N],
    ) -> [f32; N] {
        let mut totals = [0.0; N];
        let Some((first, count, sums)) = offset_terms(w, r, xs) else {
            return totals;
        };
        let shift = _mm256_set1_ps(w.offset);
        let mut acc = [_mm256_setzero_ps(); N];
        for i in (0..count).step_by(8) {
            let mut c = _mm256_mul_ps(load8(&w.scales, first + i), shift);
            if let Some(mins) = &w.mins {
                c = _mm256_add_ps(c, load8(mins, first + i));
            }
            for (a, s) in acc.iter_mut().zip(sums) {
                *a = _mm256_fmadd_ps(c, _mm256_loadu_ps(s.add(i)), *a);
            }
        }
        for (t, a) in totals.iter_mut().zip(acc) {
            let quad = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            *t = hsum128(quad);
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
        // Rows of 35 blocks (two whole groups of sixteen and three blocks of a narrow one), 12
        // (one padded group) and 6 (one narrow group).
        for blocks in [35, 12, 6] {
            let (rows, cols) = (5, blocks * BLOCK);
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
                let avx2 = unsafe { x86::dot_avx2::<1>(&packed, r, [&quantized]) }[0];
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
        // Three super-blocks: one group of sixteen blocks and half of a padded one.
        let (rows, cols) = (3, 768);
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
        // 30 activation rows run as 3 × 8 + 4 + 1 + 1; 19 blocks per row fill one group of
        // sixteen and three blocks of a padded one (the 32-element types; K-quant rows are
        // whole super-blocks). Offsets (Q4_0), minimums (Q4_1, Q4_K, Q2_K) and half-block
        // scales (Q6_K, Q2_K) all take the tiled path.
        let rows = 41;
        for (dtype, cols) in [
            (DType::Q4_0, 19 * BLOCK),
            (DType::Q4_1, 19 * BLOCK),
            (DType::Q8_0, 19 * BLOCK),
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
