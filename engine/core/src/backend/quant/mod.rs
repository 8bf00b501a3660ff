//! Block-quantized weights on the CPU: 8-bit quantization of activations, and integer dot
//! products of weight rows with quantized activations (GGUF's block types are decoded in
//! `io::blocks`).
//!
//! A matrix-vector product over quantized weights never widens the weights to f32: each
//! 32-element block of the activation row is quantized to int8 with its own scale (as
//! llama.cpp does), and each weight block contributes `d_w · d_x · Σ q_w·q_x` (plus a
//! per-block offset term for the types with minimums). [`packed`] holds the SIMD kernels over
//! weights repacked at load.

pub mod packed;

use crate::backend::tensor::Matrix;

pub use crate::io::blocks::BLOCK;

/// Blocks per group in the layout of [`QuantizedRow`] and of packed weights: one 32-bit lane
/// each of a 64-byte vector.
pub const GROUP: usize = 16;
/// Consecutive elements of a block that share a 32-bit lane.
pub const STEP: usize = 4;

/// Groups in a row of `blocks` blocks, the last one padded with zero blocks.
pub fn groups(blocks: usize) -> usize {
    blocks.div_ceil(GROUP)
}

/// One activation row quantized to int8 in blocks of 32: `x ≈ scale[b] · block b`.
///
/// The quants are stored a group of sixteen blocks at a time (see [`RowLayout`] for the last
/// one), in eight steps of four elements:
/// step `s` holds elements `4s..4s + 4` of each of the group's blocks in turn, so that in a
/// 64-byte vector of one step each 32-bit lane of the products belongs to one block, and the
/// blocks' sixteen scales multiply the lanes as they are stored. A 4-bit weight byte packs
/// element `j` and `j + 16` of its block, so its low and high nibbles line up with steps `t`
/// and `t + 4`. A row is padded with zero blocks to its last group's width (scales and sums
/// to whole groups).
#[derive(Default)]
pub struct QuantizedRow {
    /// Signed, stored as their bytes.
    quants: Lines,
    scales: Vec<f32>,
    /// `scale[b] · Σ quants` of each block: what an offset or minimum multiplies.
    sums: Vec<f32>,
    /// The same over each half block, in the order of [`half_index`].
    half_sums: Vec<f32>,
    layout: RowLayout,
}

/// Where the value of half `h` (0 or 1) of block `b` lives in an array with two values per
/// block laid out by group: a group's sixteen first halves, then its second halves.
#[inline(always)]
pub fn half_index(b: usize, h: usize) -> usize {
    (b / GROUP) * 2 * GROUP + h * GROUP + b % GROUP
}

/// Where a row's quants live: groups of sixteen blocks, the last one eight blocks wide (its
/// steps 32 bytes apart, not 64) when that holds all of its blocks, so that a row narrower than
/// a group is not stored and streamed as a whole one (hidden 192 is six blocks of a padded sixteen).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct RowLayout {
    blocks: usize,
    narrow: bool,
}

impl RowLayout {
    pub fn new(blocks: usize) -> Self {
        let rest = blocks % GROUP;
        let narrow = rest != 0 && rest <= GROUP / 2;
        Self { blocks, narrow }
    }

    /// Blocks side by side in group `g`'s steps.
    #[inline(always)]
    pub fn width(&self, g: usize) -> usize {
        if self.narrow && g == self.blocks / GROUP {
            GROUP / 2
        } else {
            GROUP
        }
    }

    /// Groups sixteen blocks wide: all but a narrow last one.
    pub fn wide_groups(&self) -> usize {
        groups(self.blocks) - usize::from(self.narrow)
    }

    /// Elements a row takes, padding included.
    pub fn elements(&self) -> usize {
        match groups(self.blocks) {
            0 => 0,
            n => (n - 1) * GROUP * BLOCK + self.width(n - 1) * BLOCK,
        }
    }

    /// Where element `i` of block `b` lives.
    #[inline(always)]
    pub fn index(&self, b: usize, i: usize) -> usize {
        let (g, width) = (b / GROUP, self.width(b / GROUP));
        g * GROUP * BLOCK + (i / STEP) * width * STEP + STEP * (b % GROUP) + i % STEP
    }
}

impl QuantizedRow {
    /// Quantizes `x` (a multiple of 32 long) symmetrically, block by block, rounding to nearest.
    pub fn new(x: &[f32]) -> Self {
        debug_assert!(x.len().is_multiple_of(BLOCK));
        let blocks = x.len() / BLOCK;
        let padded = groups(blocks) * GROUP;
        let layout = RowLayout::new(blocks);
        let mut row = Self {
            quants: Lines::zeroed(layout.elements()),
            scales: vec![0.0; padded],
            sums: vec![0.0; padded],
            half_sums: vec![0.0; 2 * padded],
            layout,
        };
        for (b, values) in x.chunks_exact(BLOCK).enumerate() {
            let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut quants = [0i8; BLOCK];
            for (q, v) in quants.iter_mut().zip(values) {
                *q = round_half_away(v * inverse);
            }
            for (s, run) in quants.chunks_exact(STEP).enumerate() {
                let at = layout.index(b, STEP * s);
                for (to, q) in row.quants[at..at + STEP].iter_mut().zip(run) {
                    *to = *q as u8;
                }
            }
            let sums = [0, 1].map(|h| {
                let half = &quants[16 * h..16 * (h + 1)];
                half.iter().map(|q| *q as i32).sum::<i32>()
            });
            row.scales[b] = scale;
            row.sums[b] = scale * (sums[0] + sums[1]) as f32;
            for (h, sum) in sums.iter().enumerate() {
                row.half_sums[half_index(b, h)] = scale * *sum as f32;
            }
        }
        row
    }

    pub fn blocks(&self) -> usize {
        self.layout.blocks
    }

    /// The rounded activations, `scale · quant`, in element order.
    pub fn dequantize(&self, out: &mut [f32]) {
        for (b, (out, scale)) in out.chunks_exact_mut(BLOCK).zip(&self.scales).enumerate() {
            for (o, q) in out.iter_mut().zip(self.block(b)) {
                *o = scale * q as f32;
            }
        }
    }

    /// Block `b`'s quants in element order.
    fn block(&self, b: usize) -> [i8; BLOCK] {
        std::array::from_fn(|i| self.quants[self.layout.index(b, i)] as i8)
    }
}

/// Bytes that start on a cache line, so that the kernels' 64-byte loads of a group's steps
/// never straddle two lines (a `Vec<u8>` starts where the allocator puts it, 16-byte aligned:
/// most loads were split in two).
#[derive(Clone, Default)]
pub struct Lines {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl Lines {
    pub fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![Line([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    /// `parts` one after another, each copied once.
    pub fn concat<'a>(parts: impl Iterator<Item = &'a [u8]> + Clone) -> Self {
        let mut lines = Self::zeroed(parts.clone().map(<[u8]>::len).sum());
        let mut at = 0;
        for part in parts {
            lines[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        lines
    }
}

impl std::ops::Deref for Lines {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the lines hold at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl std::ops::DerefMut for Lines {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// `x` rounded half away from zero and saturated to i8, as `x.round() as i8` is, in integer
/// operations that vectorise (`round` is a libm call on baseline x86-64).
#[inline(always)]
fn round_half_away(x: f32) -> i8 {
    let t = x as i32;
    let frac = x - t as f32;
    (t + (frac >= 0.5) as i32 - (frac <= -0.5) as i32).clamp(-128, 127) as i8
}

/// Each row of `x` quantized, rows side by side on the pool's threads.
pub fn quantize_rows(x: &Matrix) -> Vec<QuantizedRow> {
    let mut rows: Vec<QuantizedRow> = (0..x.rows).map(|_| QuantizedRow::default()).collect();
    // One row is quicker alone than a parallel section.
    if x.rows == 1 {
        rows[0] = QuantizedRow::new(x.row(0));
        return rows;
    }
    crate::backend::cpu::pool::pool().for_each_chunk(&mut rows, 1, |i, row| {
        row[0] = QuantizedRow::new(x.row(i));
    });
    rows
}

/// The values the rows of `x` round to when quantized: what a product with quantized weights
/// sees where it multiplies in f32.
pub fn round_activations(x: &Matrix) -> Matrix {
    let mut rounded = Matrix::zeros(x.rows, x.cols);
    for (out, row) in rounded.rows_iter_mut().zip(x.rows_iter()) {
        QuantizedRow::new(row).dequantize(out);
    }
    rounded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_matches_f32_round() {
        let mut x = -130.0f32;
        while x <= 130.0 {
            for v in [x, x.next_up(), x.next_down()] {
                assert_eq!(round_half_away(v), v.round() as i8, "{v}");
            }
            x += 0.25;
        }
    }

    #[test]
    fn activations_quantize_to_the_nearest_step_of_their_block() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let row = QuantizedRow::new(&x);
        for (b, values) in x.chunks_exact(BLOCK).enumerate() {
            let scale = values.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            assert_eq!(row.scales[b], scale);
            for (i, v) in values.iter().enumerate() {
                let q = row.block(b)[i] as f32;
                assert!((q * scale - v).abs() <= scale / 2.0 + 1e-6);
            }
        }
    }
}
