//! Quantized weights repacked at load for the integer matrix-vector kernels: each row's quants
//! contiguous, 8-bit ones in the grouped layout of [`QuantizedRow`], 4-bit ones as GGUF packs a
//! block (whose nibbles line up with that layout by construction), and the block scales in an
//! array of their own. A group of four blocks then takes two 64-byte multiply-accumulates
//! (AVX-512 VNNI) or four 32-byte ones (AVX2), and one f16→f32 conversion for its four scales.

use half::f16;

use super::{grouped_index, QuantizedRow, BLOCK, GROUP};
use crate::cpu;
use crate::ops::Linear;
use crate::tensor::Matrix;
use crate::weights::{DType, Weight, WeightData};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bits {
    Eight,
    Four,
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
    /// One per block, row-major.
    scales: Vec<f16>,
    /// One per block, for asymmetric formats.
    mins: Option<Vec<f32>>,
    /// Added to every quant: −8 for symmetric 4-bit blocks, else 0.
    offset: f32,
}

impl PackedMatrix {
    /// A GGUF Q8_0, Q4_0 or Q4_1 weight, repacked; `None` for other types.
    pub fn from_gguf(weight: &Weight) -> Option<Self> {
        let WeightData::Blocks(data) = weight.data() else {
            return None;
        };
        let (bits, offset, asymmetric) = match weight.dtype {
            DType::Q8_0 => (Bits::Eight, 0.0, false),
            DType::Q4_0 => (Bits::Four, -8.0, false),
            DType::Q4_1 => (Bits::Four, 0.0, true),
            _ => return None,
        };
        let (rows, cols) = (weight.shape[0], weight.shape[1]);
        let blocks = cols / BLOCK;
        let (_, block_bytes) = weight.dtype.block();
        let mut packed = Self {
            bits,
            rows,
            cols,
            quants: vec![0; rows * Self::row_bytes(bits, cols)],
            scales: Vec::with_capacity(rows * blocks),
            mins: asymmetric.then(|| Vec::with_capacity(rows * blocks)),
            offset,
        };
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]);
        for (i, block) in data.chunks_exact(block_bytes).enumerate() {
            let (r, b) = (i / blocks, i % blocks);
            packed.scales.push(half(block));
            let quants = match &mut packed.mins {
                Some(mins) => {
                    mins.push(half(&block[2..]).to_f32());
                    &block[4..]
                }
                None => &block[2..],
            };
            let row = &mut packed.quants[r * Self::row_bytes(bits, cols)..];
            match bits {
                Bits::Eight => {
                    for (e, q) in quants.iter().enumerate() {
                        row[grouped_index(blocks, b, e)] = *q;
                    }
                }
                Bits::Four => row[b * 16..(b + 1) * 16].copy_from_slice(quants),
            }
        }
        Some(packed)
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

    /// What block `b` of row `r` adds per unit of its activation block's sum.
    fn block_offset(&self, r: usize, b: usize, bias: f32) -> f32 {
        let at = r * self.blocks() + b;
        let min = self.mins.as_ref().map_or(0.0, |m| m[at]);
        (self.offset + bias) * self.scales[at].to_f32() + min
    }

    /// Row `r` widened to f32.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        for b in 0..self.blocks() {
            let d = self.scales[r * self.blocks() + b].to_f32();
            let min = self.block_offset(r, b, 0.0) - self.offset * d;
            for i in 0..BLOCK {
                out[b * BLOCK + i] = d * (self.quant(r, b, i) as f32 + self.offset) + min;
            }
        }
    }

    /// The dot product of row `r` with a quantized activation row.
    pub fn dot(&self, r: usize, x: &QuantizedRow) -> f32 {
        debug_assert_eq!(x.blocks(), self.blocks());
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY (both): the features were just detected; the row and `x` hold
            // `self.blocks()` blocks each, which is all the kernels read.
            if x86::has_avx512() {
                return unsafe { x86::dot_avx512(self, r, x) };
            }
            if x86::has_avx2() {
                return unsafe { x86::dot_avx2(self, r, x) };
            }
        }
        self.dot_blocks(r, x, 0..self.blocks())
    }

    /// The part of the dot product of row `r` over `blocks`, one element at a time.
    fn dot_blocks(&self, r: usize, x: &QuantizedRow, blocks: std::ops::Range<usize>) -> f32 {
        let mut total = 0.0;
        for b in blocks {
            let quants = x.block(b);
            let products: i32 = (0..BLOCK)
                .map(|i| self.quant(r, b, i) * quants[i] as i32)
                .sum();
            let d = self.scales[r * self.blocks() + b].to_f32();
            total += d * x.scales[b] * products as f32 + self.block_offset(r, b, 0.0) * x.sums[b];
        }
        total
    }
}

/// A linear layer over a packed weight.
pub struct PackedLinear(pub PackedMatrix);

impl Linear for PackedLinear {
    fn forward(&self, x: &Matrix) -> Matrix {
        let w = &self.0;
        assert_eq!(x.cols, w.cols, "linear: input width does not match weight");
        let mut out = Matrix::zeros(x.rows, w.rows);
        if x.rows <= cpu::GEMV_MAX_ROWS {
            let quantized: Vec<QuantizedRow> = x.rows_iter().map(QuantizedRow::new).collect();
            cpu::gemv_rows(
                &mut out,
                || (),
                |_, r, dst| {
                    for (d, q) in dst.iter_mut().zip(&quantized) {
                        *d = w.dot(r, q);
                    }
                },
            );
        } else {
            cpu::gemm_widened(x, &mut out, |r, row| w.row_to_f32(r, row));
        }
        out
    }

    fn weight_bytes(&self) -> usize {
        let w = &self.0;
        w.quants.len() + 2 * w.scales.len() + w.mins.as_ref().map_or(0, |m| 4 * m.len())
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Bits, PackedMatrix, QuantizedRow, BLOCK, GROUP};

    pub fn has_avx512() -> bool {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }

    pub fn has_avx2() -> bool {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }

    /// Per group of four blocks: the weight scales times the activation scales, and the
    /// per-block offsets (with `bias` added to every quant) times the activation sums.
    #[inline(always)]
    unsafe fn group_scales(
        w: &PackedMatrix,
        r: usize,
        g: usize,
        x: &QuantizedRow,
        bias: f32,
        offsets: &mut __m128,
    ) -> __m128 {
        let at = r * w.blocks() + g * GROUP;
        let d = _mm_cvtph_ps(_mm_loadl_epi64(w.scales.as_ptr().add(at).cast()));
        let mut c = _mm_mul_ps(d, _mm_set1_ps(w.offset + bias));
        if let Some(mins) = &w.mins {
            c = _mm_add_ps(c, _mm_loadu_ps(mins.as_ptr().add(at)));
        }
        *offsets = _mm_fmadd_ps(c, _mm_loadu_ps(x.sums.as_ptr().add(g * GROUP)), *offsets);
        _mm_mul_ps(d, _mm_loadu_ps(x.scales.as_ptr().add(g * GROUP)))
    }

    #[inline(always)]
    unsafe fn hsum128(v: __m128) -> f32 {
        let pair = _mm_add_ps(v, _mm_movehl_ps(v, v));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
    }

    /// `vpdpbusd` multiplies unsigned by signed bytes: 8-bit weights are shifted to unsigned
    /// by flipping their sign bit (+128), which the offsets take back out.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
    pub unsafe fn dot_avx512(w: &PackedMatrix, r: usize, x: &QuantizedRow) -> f32 {
        let groups = w.blocks() / GROUP;
        let quants = w.row_quants(r).as_ptr();
        let xq = x.quants.as_ptr();
        let bias = if w.bits == Bits::Eight { -128.0 } else { 0.0 };
        // Lane i of the products belongs to block i / 4 of the group.
        let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        let (low, flip) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(-128));
        let mut acc = _mm512_setzero_ps();
        let mut offsets = _mm_setzero_ps();
        for g in 0..groups {
            let (a, b) = match w.bits {
                Bits::Four => {
                    let packed = _mm512_loadu_si512(quants.add(64 * g).cast());
                    (
                        _mm512_and_si512(packed, low),
                        _mm512_and_si512(_mm512_srli_epi16(packed, 4), low),
                    )
                }
                Bits::Eight => (
                    _mm512_xor_si512(_mm512_loadu_si512(quants.add(128 * g).cast()), flip),
                    _mm512_xor_si512(_mm512_loadu_si512(quants.add(128 * g + 64).cast()), flip),
                ),
            };
            let xa = _mm512_loadu_si512(xq.add(GROUP * BLOCK * g).cast());
            let xb = _mm512_loadu_si512(xq.add(GROUP * BLOCK * g + 64).cast());
            let products =
                _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), a, xa), b, xb);
            let scales = group_scales(w, r, g, x, bias, &mut offsets);
            let scales = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(scales));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(products), scales, acc);
        }
        _mm512_reduce_add_ps(acc)
            + hsum128(offsets)
            + w.dot_blocks(r, x, groups * GROUP..w.blocks())
    }

    /// `vpmaddubsw` saturates at 16 bits, so 8-bit weights keep their sign, moved onto the
    /// activations (`|w| · (x · sign w)`); 4-bit ones multiply directly.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2(w: &PackedMatrix, r: usize, x: &QuantizedRow) -> f32 {
        let groups = w.blocks() / GROUP;
        let quants = w.row_quants(r).as_ptr();
        let xq = x.quants.as_ptr();
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let pairs = [
            _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0),
            _mm256_set_epi32(3, 3, 3, 3, 2, 2, 2, 2),
        ];
        let mut acc = _mm256_setzero_ps();
        let mut offsets = _mm_setzero_ps();
        for g in 0..groups {
            let scales = _mm256_castps128_ps256(group_scales(w, r, g, x, 0.0, &mut offsets));
            // Two blocks at a time: their first halves, then their second halves.
            for (half, spread) in pairs.iter().enumerate() {
                let xa = _mm256_loadu_si256(xq.add(GROUP * BLOCK * g + 32 * half).cast());
                let xb = _mm256_loadu_si256(xq.add(GROUP * BLOCK * g + 64 + 32 * half).cast());
                let sums = match w.bits {
                    Bits::Four => {
                        let packed = _mm256_loadu_si256(quants.add(64 * g + 32 * half).cast());
                        let a = _mm256_and_si256(packed, low);
                        let b = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                        _mm256_add_epi16(_mm256_maddubs_epi16(a, xa), _mm256_maddubs_epi16(b, xb))
                    }
                    Bits::Eight => {
                        let a = _mm256_loadu_si256(quants.add(128 * g + 32 * half).cast());
                        let b = _mm256_loadu_si256(quants.add(128 * g + 64 + 32 * half).cast());
                        let signed = |w, x| {
                            _mm256_madd_epi16(
                                _mm256_maddubs_epi16(
                                    _mm256_sign_epi8(w, w),
                                    _mm256_sign_epi8(x, w),
                                ),
                                ones,
                            )
                        };
                        let products = _mm256_add_epi32(signed(a, xa), signed(b, xb));
                        let scale = _mm256_permutevar8x32_ps(scales, *spread);
                        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), scale, acc);
                        continue;
                    }
                };
                let products = _mm256_madd_epi16(sums, ones);
                let scale = _mm256_permutevar8x32_ps(scales, *spread);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), scale, acc);
            }
        }
        let quad = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        hsum128(quad) + hsum128(offsets) + w.dot_blocks(r, x, groups * GROUP..w.blocks())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequantize, quantize_q4_0, quantize_q8_0};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
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
        let quantized = QuantizedRow::new(&x);
        for (dtype, bytes) in [
            (DType::Q8_0, quantize_q8_0(&w)),
            (DType::Q4_0, quantize_q4_0(&w)),
            (DType::Q4_1, quantize_q4_1(&w)),
        ] {
            let mut expected = vec![0.0; rows * cols];
            dequantize(dtype, &bytes, &mut expected);
            let weight = Weight::from_bytes(bytes, dtype, vec![rows, cols]);
            let packed = PackedMatrix::from_gguf(&weight).unwrap();
            let mut row = vec![0.0; cols];
            for r in 0..rows {
                packed.row_to_f32(r, &mut row);
                assert_eq!(row, expected[r * cols..(r + 1) * cols], "{dtype} row {r}");
                let reference = packed.dot_blocks(r, &quantized, 0..cols / BLOCK);
                let direct = crate::quant::dot(dtype, &weight_row(&weight, r), &quantized);
                assert!((reference - direct).abs() <= 1e-5 * direct.abs().max(1.0));
                let simd = packed.dot(r, &quantized);
                assert!(
                    (simd - reference).abs() <= 1e-5 * reference.abs().max(1.0),
                    "{dtype} row {r}: {simd} vs {reference}"
                );
                #[cfg(target_arch = "x86_64")]
                if x86::has_avx2() {
                    // SAFETY: detected just above.
                    let avx2 = unsafe { x86::dot_avx2(&packed, r, &quantized) };
                    assert!((avx2 - reference).abs() <= 1e-5 * reference.abs().max(1.0));
                }
            }
        }
    }

    fn weight_row(weight: &Weight, r: usize) -> Vec<u8> {
        let WeightData::Blocks(data) = weight.data() else {
            unreachable!()
        };
        let row_bytes = weight.dtype.bytes_for(weight.shape[1]).unwrap();
        data[r * row_bytes..(r + 1) * row_bytes].to_vec()
    }
}
