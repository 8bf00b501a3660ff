//! Block-quantized weights: dequantization of every GGUF block type, 8-bit quantization of
//! activations, and integer dot products of weight rows with quantized activations.
//!
//! A matrix-vector product over quantized weights never widens the weights to f32: each
//! 32-element block of the activation row is quantized to int8 with its own scale (as
//! llama.cpp does), and each weight block contributes `d_w · d_x · Σ q_w·q_x` (plus a
//! per-block offset term for the types with minimums). [`packed`] holds the SIMD kernels over
//! weights repacked at load; [`dot`] here reads GGUF blocks as stored, one element at a time.

pub mod packed;

use half::{bf16, f16};

use crate::backend::tensor::Matrix;
use crate::io::weights::DType;

/// Elements per block of the 32-element types and of quantized activations.
pub const BLOCK: usize = 32;

/// Blocks per group in the layout of [`QuantizedRow`] and of packed weights.
pub const GROUP: usize = 4;

/// One activation row quantized to int8 in blocks of 32: `x ≈ scale[b] · block b`.
///
/// The quants are stored a group of four blocks at a time, first halves then second halves:
/// `b0[0..16] b1[0..16] b2[0..16] b3[0..16] b0[16..32] … b3[16..32]` (a shorter last group
/// alike). A 4-bit weight block packs element `j` and `j + 16` in one byte, so the low and high
/// nibbles of four consecutive blocks line up with the two halves of a group in two 64-byte
/// vectors, and one scale covers four adjacent 32-bit lanes of the products.
pub struct QuantizedRow {
    quants: Vec<i8>,
    scales: Vec<f32>,
    /// `scale[b] · Σ quants` of each block: what an offset or minimum multiplies.
    sums: Vec<f32>,
    /// The same over each half block, in the order of [`half_index`].
    half_sums: Vec<f32>,
}

/// Where the value of half `h` (0 or 1) of block `b` lives, in a row of `blocks` blocks, in an
/// array with two values per block laid out like the grouped quants: a group's first halves,
/// then its second halves.
#[inline(always)]
pub fn half_index(blocks: usize, b: usize, h: usize) -> usize {
    let (group, j) = (b / GROUP, b % GROUP);
    let width = GROUP.min(blocks - group * GROUP);
    2 * group * GROUP + h * width + j
}

/// Where element `i` of block `b` lives in a row of `blocks` blocks in the grouped layout.
#[inline(always)]
pub fn grouped_index(blocks: usize, b: usize, i: usize) -> usize {
    let (group, j) = (b / GROUP, b % GROUP);
    let width = GROUP.min(blocks - group * GROUP);
    let half = if i < 16 { 0 } else { 16 * width };
    group * GROUP * BLOCK + half + 16 * j + i % 16
}

impl QuantizedRow {
    /// Quantizes `x` (a multiple of 32 long) symmetrically, block by block, rounding to nearest.
    pub fn new(x: &[f32]) -> Self {
        debug_assert!(x.len().is_multiple_of(BLOCK));
        let blocks = x.len() / BLOCK;
        let mut row = Self {
            quants: vec![0; x.len()],
            scales: Vec::with_capacity(blocks),
            sums: Vec::with_capacity(blocks),
            half_sums: vec![0.0; 2 * blocks],
        };
        for (b, values) in x.chunks_exact(BLOCK).enumerate() {
            let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sums = [0i32; 2];
            for (i, v) in values.iter().enumerate() {
                let q = (v * inverse).round() as i8;
                row.quants[grouped_index(blocks, b, i)] = q;
                sums[i / 16] += q as i32;
            }
            row.scales.push(scale);
            row.sums.push(scale * (sums[0] + sums[1]) as f32);
            for (h, sum) in sums.iter().enumerate() {
                row.half_sums[half_index(blocks, b, h)] = scale * *sum as f32;
            }
        }
        row
    }

    pub fn blocks(&self) -> usize {
        self.scales.len()
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
        std::array::from_fn(|i| self.quants[grouped_index(self.blocks(), b, i)])
    }
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

/// The element of largest magnitude of a block, with its sign.
fn extreme(block: &[f32]) -> f32 {
    block
        .iter()
        .fold(0.0f32, |m, v| if v.abs() > m.abs() { *v } else { m })
}

/// `values` (a multiple of 32 long) as Q8_0 blocks, by llama.cpp's reference rounding: each
/// block scaled by its largest magnitude / 127.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / BLOCK * 34);
    for block in values.chunks_exact(BLOCK) {
        let d = extreme(block).abs() / 127.0;
        let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|v| (v * inverse).round() as i8 as u8));
    }
    out
}

/// `values` (a multiple of 32 long) as Q4_0 blocks, by llama.cpp's reference rounding: each
/// block scaled by its value of largest magnitude / −8, which thus maps exactly to −8.
pub fn quantize_q4_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / BLOCK * 18);
    for block in values.chunks_exact(BLOCK) {
        let d = extreme(block) / -8.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        let nibble = |v: f32| ((v * inverse + 8.5) as u8).min(15);
        out.extend((0..16).map(|j| nibble(block[j]) | nibble(block[j + 16]) << 4));
    }
    out
}

/// One block of a 32-element type as signed values and `(d, m)`: `weight = d · value + m`.
fn unpack(dtype: DType, block: &[u8], values: &mut [i8; BLOCK]) -> (f32, f32) {
    let d = half(block);
    if dtype == DType::Q8_0 {
        for (v, q) in values.iter_mut().zip(&block[2..]) {
            *v = *q as i8;
        }
        return (d, 0.0);
    }
    let (m, high, quants, offset) = nibble_layout(dtype, block);
    for (j, q) in quants.iter().enumerate() {
        for (k, nibble) in [(j, q & 0x0F), (j + 16, q >> 4)] {
            let fifth = ((high >> k) & 1) as u8;
            values[k] = (nibble | fifth << 4) as i8 - offset as i8;
        }
    }
    (d, m)
}

/// The 4- and 5-bit types: element `j` of a block is the low nibble of byte `j`, element
/// `j + 16` its high nibble; the 5-bit types add bit `j` of a 32-bit mask as the fifth bit.
/// Symmetric types subtract the midpoint (`offset`), the others add a per-block minimum `m`.
/// Returns `(m, fifth bits, nibbles, offset)`.
fn nibble_layout(dtype: DType, block: &[u8]) -> (f32, u32, &[u8], u8) {
    let mask = |b: &[u8]| u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
    match dtype {
        DType::Q4_0 => (0.0, 0, &block[2..18], 8),
        DType::Q4_1 => (half(&block[2..]), 0, &block[4..20], 0),
        DType::Q5_0 => (0.0, mask(&block[2..]), &block[6..22], 16),
        DType::Q5_1 => (half(&block[2..]), mask(&block[4..]), &block[8..24], 0),
        other => unreachable!("{other} is not a 32-element nibble type"),
    }
}

fn half(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantizes `data` of type `dtype` into `out`, which holds exactly its elements.
pub fn dequantize(dtype: DType, data: &[u8], out: &mut [f32]) {
    let (per_block, block_bytes) = dtype.block();
    for (block, out) in data
        .chunks_exact(block_bytes)
        .zip(out.chunks_mut(per_block))
    {
        match dtype {
            DType::F32 => out[0] = f32::from_le_bytes(block.try_into().expect("4 bytes")),
            DType::F16 => out[0] = half(block),
            DType::BF16 => out[0] = bf16::from_le_bytes([block[0], block[1]]).to_f32(),
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 => {
                let mut values = [0i8; BLOCK];
                let (d, m) = unpack(dtype, block, &mut values);
                for (o, v) in out.iter_mut().zip(values) {
                    *o = d * v as f32 + m;
                }
            }
            DType::Q2K | DType::Q3K | DType::Q4K | DType::Q5K | DType::Q6K => {
                let k = KBlock::new(dtype, block);
                for (e, o) in out.iter_mut().enumerate() {
                    *o = k.scale(e / k.run) * k.quants[e] as f32 + k.min(e / k.run);
                }
            }
        }
    }
}

/// A K-quant super-block of 256 elements as integers with a scale and a minimum
/// per run of `run` elements: element `e` is `d · factors[e / run] · quants[e] − dmin ·
/// min_factors[e / run]`, computed in that order as llama.cpp does.
pub(crate) struct KBlock {
    pub quants: [i8; 256],
    pub d: f32,
    pub dmin: f32,
    pub factors: [i8; 16],
    pub min_factors: [i8; 16],
    /// 32 for Q4_K and Q5_K (8 runs), 16 for Q2_K, Q3_K and Q6_K (16 runs).
    pub run: usize,
}

impl KBlock {
    pub fn new(dtype: DType, block: &[u8]) -> Self {
        let mut k = Self {
            quants: [0; 256],
            d: 0.0,
            dmin: 0.0,
            factors: [0; 16],
            min_factors: [0; 16],
            run: 32,
        };
        match dtype {
            DType::Q2K => {
                let (scales, qs) = (&block[..16], &block[16..80]);
                (k.d, k.dmin) = (half(&block[80..]), half(&block[82..]));
                k.run = 16;
                for (j, sc) in scales.iter().enumerate() {
                    (k.factors[j], k.min_factors[j]) = ((sc & 0xF) as i8, (sc >> 4) as i8);
                }
                for (e, q) in k.quants.iter_mut().enumerate() {
                    let (g, s, i) = split(e);
                    *q = ((qs[g * 32 + i] >> (2 * s)) & 3) as i8;
                }
            }
            DType::Q3K => {
                let (hmask, qs, scales) = (&block[..32], &block[32..96], &block[96..108]);
                k.d = half(&block[108..]);
                k.run = 16;
                for (j, f) in k.factors.iter_mut().enumerate() {
                    let low = (scales[j % 8] >> (4 * (j / 8))) & 0xF;
                    let high = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
                    *f = (low | high << 4) as i8 - 32;
                }
                for (e, q) in k.quants.iter_mut().enumerate() {
                    let (g, s, i) = split(e);
                    let low_bits = ((qs[g * 32 + i] >> (2 * s)) & 3) as i8;
                    let high_bit = ((hmask[i] >> (e / 32)) & 1) as i8;
                    *q = low_bits - ((high_bit ^ 1) << 2);
                }
            }
            DType::Q6K => {
                let (ql, qh, scales) = (&block[..128], &block[128..192], &block[192..208]);
                k.d = half(&block[208..]);
                k.run = 16;
                for (e, q) in k.quants.iter_mut().enumerate() {
                    let (h, r, i) = split(e);
                    let low = (ql[h * 64 + (r % 2) * 32 + i] >> (4 * (r / 2))) & 0xF;
                    let high = (qh[h * 32 + i] >> (2 * r)) & 3;
                    *q = (low | high << 4) as i8 - 32;
                }
                for (f, sc) in k.factors.iter_mut().zip(scales) {
                    *f = *sc as i8;
                }
            }
            _ => {
                (k.d, k.dmin) = (half(block), half(&block[2..]));
                let (scale, min) = k_scales(&block[4..16]);
                let (qh, qs) = match dtype {
                    DType::Q5K => (Some(&block[16..48]), &block[48..176]),
                    _ => (None, &block[16..144]),
                };
                for (e, q) in k.quants.iter_mut().enumerate() {
                    let (j, i) = (e / 32, e % 32);
                    let low = (qs[j / 2 * 32 + i] >> (4 * (j % 2))) & 0xF;
                    let fifth = qh.map_or(0, |h| (h[i] >> j) & 1);
                    *q = (low | fifth << 4) as i8;
                }
                for j in 0..8 {
                    k.factors[j] = scale[j] as i8;
                    k.min_factors[j] = min[j] as i8;
                }
            }
        }
        k
    }

    /// The scale of run `j`.
    pub fn scale(&self, j: usize) -> f32 {
        self.d * self.factors[j] as f32
    }

    /// The minimum of run `j` (added to every scaled element).
    pub fn min(&self, j: usize) -> f32 {
        -(self.dmin * self.min_factors[j] as f32)
    }
}

/// Element `e` of a 256-element super-block as (half, row, column): the K-quants store two
/// halves of 128, each as four rows of 32 that share bytes at different bit positions.
fn split(e: usize) -> (usize, usize, usize) {
    (e / 128, e % 128 / 32, e % 32)
}

/// The eight 6-bit scales and minimums of a Q4_K/Q5_K super-block, packed in 12 bytes: the
/// first four of each in the low six bits of bytes 0–3 and 4–7, the last four split between
/// the nibbles of bytes 8–11 and the top two bits of bytes 0–7.
fn k_scales(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut scale, mut min) = ([0; 8], [0; 8]);
    for k in 0..4 {
        scale[k] = packed[k] & 0x3F;
        min[k] = packed[k + 4] & 0x3F;
        scale[k + 4] = (packed[k + 8] & 0x0F) | ((packed[k] >> 2) & 0x30);
        min[k + 4] = (packed[k + 8] >> 4) | ((packed[k + 4] >> 2) & 0x30);
    }
    (scale, min)
}

#[cfg(test)]
mod tests {
    use super::*;

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
