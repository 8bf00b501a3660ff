//! Block-quantized weights: dequantization of every GGUF block type, 8-bit quantization of
//! activations, and integer dot products of weight rows with quantized activations.
//!
//! A matrix-vector product over quantized weights never widens the weights to f32: each
//! 32-element block of the activation row is quantized to int8 with its own scale (as
//! llama.cpp does), and each weight block contributes `d_w · d_x · Σ q_w·q_x` (plus a
//! per-block offset term for the types with minimums), computed with 8-bit SIMD multiplies.

use half::{bf16, f16};

use crate::weights::DType;

/// Elements per block of the 32-element types and of quantized activations.
pub const BLOCK: usize = 32;

/// One activation row quantized to int8 in blocks of 32: `x ≈ scale[b] · quants[32b..32b+32]`.
pub struct QuantizedRow {
    quants: Vec<i8>,
    scales: Vec<f32>,
    /// `scale[b] · Σ quants` of each block: what an offset or minimum multiplies.
    sums: Vec<f32>,
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
        };
        for (values, quants) in x
            .chunks_exact(BLOCK)
            .zip(row.quants.chunks_exact_mut(BLOCK))
        {
            let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = max / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in quants.iter_mut().zip(values) {
                *q = (v * inverse).round() as i8;
                sum += *q as i32;
            }
            row.scales.push(scale);
            row.sums.push(scale * sum as f32);
        }
        row
    }
}

/// Whether rows of `dtype` have an integer dot product with [`QuantizedRow`]; the K-quants
/// are dequantized a row at a time instead.
pub fn has_integer_dot(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1
    )
}

/// The dot product of one weight row (`row`: its blocks of `dtype`, for which
/// [`has_integer_dot`] holds) with a quantized activation row of the same length.
pub fn dot(dtype: DType, row: &[u8], x: &QuantizedRow) -> f32 {
    debug_assert_eq!(dtype.bytes_for(x.quants.len()), Some(row.len()));
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features were just detected; `row` holds one block per 32 elements
            // of `x`, checked above in debug builds and by construction of the weight.
            unsafe {
                match dtype {
                    DType::Q8_0 => return x86::dot_q8_0(row, x),
                    DType::Q4_0 => return x86::dot_q4::<false>(row, x),
                    DType::Q4_1 => return x86::dot_q4::<true>(row, x),
                    _ => {}
                }
            }
        }
    }
    dot_portable(dtype, row, x)
}

/// Any 32-element type: each block unpacked to signed 8-bit values `v` with
/// `weight = d · v + m`.
fn dot_portable(dtype: DType, row: &[u8], x: &QuantizedRow) -> f32 {
    let (_, block_bytes) = dtype.block();
    let mut values = [0i8; BLOCK];
    let mut total = 0.0f32;
    for (b, block) in row.chunks_exact(block_bytes).enumerate() {
        let (d, m) = unpack(dtype, block, &mut values);
        let quants = &x.quants[b * BLOCK..(b + 1) * BLOCK];
        let products: i32 = values
            .iter()
            .zip(quants)
            .map(|(v, q)| *v as i32 * *q as i32)
            .sum();
        total += d * x.scales[b] * products as f32 + m * x.sums[b];
    }
    total
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
            DType::Q2K => {
                let (d, dmin) = (half(&block[80..]), half(&block[82..]));
                let (scales, qs) = (&block[..16], &block[16..80]);
                for (e, o) in out.iter_mut().enumerate() {
                    let (scale, (g, s, i)) = (scales[e / 16], split(e));
                    let q = ((qs[g * 32 + i] >> (2 * s)) & 3) as f32;
                    *o = d * (scale & 0xF) as f32 * q - dmin * (scale >> 4) as f32;
                }
            }
            DType::Q3K => {
                let (hmask, qs, scales) = (&block[..32], &block[32..96], &block[96..108]);
                let d = half(&block[108..]);
                for (e, o) in out.iter_mut().enumerate() {
                    let k = e / 16;
                    let low = (scales[k % 8] >> (4 * (k / 8))) & 0xF;
                    let high = (scales[8 + k % 4] >> (2 * (k / 4))) & 3;
                    let scale = (low | high << 4) as i8 as f32 - 32.0;
                    let (g, s, i) = split(e);
                    let low_bits = ((qs[g * 32 + i] >> (2 * s)) & 3) as i8;
                    let high_bit = ((hmask[i] >> (e / 32)) & 1) as i8;
                    *o = d * scale * (low_bits - ((high_bit ^ 1) << 2)) as f32;
                }
            }
            DType::Q4K | DType::Q5K => {
                let (d, dmin) = (half(block), half(&block[2..]));
                let (scale, min) = k_scales(&block[4..16]);
                let (qh, qs) = match dtype {
                    DType::Q5K => (Some(&block[16..48]), &block[48..176]),
                    _ => (None, &block[16..144]),
                };
                for (e, o) in out.iter_mut().enumerate() {
                    let (j, i) = (e / 32, e % 32);
                    let low = (qs[j / 2 * 32 + i] >> (4 * (j % 2))) & 0xF;
                    let fifth = qh.map_or(0, |h| (h[i] >> j) & 1);
                    let q = (low | fifth << 4) as f32;
                    *o = d * scale[j] as f32 * q - dmin * min[j] as f32;
                }
            }
            DType::Q6K => {
                let (ql, qh, scales) = (&block[..128], &block[128..192], &block[192..208]);
                let d = half(&block[208..]);
                for (e, o) in out.iter_mut().enumerate() {
                    let (h, r, i) = split(e);
                    let low = (ql[h * 64 + (r % 2) * 32 + i] >> (4 * (r / 2))) & 0xF;
                    let high = (qh[h * 32 + i] >> (2 * r)) & 3;
                    let q = (low | high << 4) as i8 - 32;
                    *o = d * scales[e / 16] as i8 as f32 * q as f32;
                }
            }
        }
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{QuantizedRow, BLOCK};

    /// f16 bits at `p` as f32, by the F16C instruction.
    #[inline(always)]
    unsafe fn half_at(p: *const u8) -> f32 {
        let bits = p.cast::<u16>().read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
    }

    /// Sums of adjacent pairs of `u8 × i8` products, widened to eight i32 lanes.
    #[inline(always)]
    unsafe fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
    }

    /// Q8_0: signed × signed. `maddubs` takes one unsigned operand, so the weight's sign moves
    /// onto the activations: `|w| · (x · sign w)`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0(row: &[u8], x: &QuantizedRow) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, block) in row.chunks_exact(34).enumerate() {
            let w = _mm256_loadu_si256(block.as_ptr().add(2).cast());
            let q = _mm256_loadu_si256(x.quants.as_ptr().add(b * BLOCK).cast());
            let products = dot_u8_i8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q, w));
            let scale = _mm256_set1_ps(half_at(block.as_ptr()) * x.scales[b]);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(products), scale, acc);
        }
        hsum(acc)
    }

    /// Q4_0 (`MIN` false: `d · (q − 8)`) and Q4_1 (`MIN`: `d · q + m`): the unsigned nibbles
    /// multiply the activations directly, and the offset or minimum is added per block as a
    /// multiple of the block's activation sum.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4<const MIN: bool>(row: &[u8], x: &QuantizedRow) -> f32 {
        let (block_bytes, quants_at) = if MIN { (20, 4) } else { (18, 2) };
        let low_nibbles = _mm_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        let mut offsets = 0.0f32;
        for (b, block) in row.chunks_exact(block_bytes).enumerate() {
            let d = half_at(block.as_ptr());
            let packed = _mm_loadu_si128(block.as_ptr().add(quants_at).cast());
            let low = _mm_and_si128(packed, low_nibbles);
            let high = _mm_and_si128(_mm_srli_epi16(packed, 4), low_nibbles);
            let w = _mm256_set_m128i(high, low);
            let q = _mm256_loadu_si256(x.quants.as_ptr().add(b * BLOCK).cast());
            let scale = _mm256_set1_ps(d * x.scales[b]);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_i8(w, q)), scale, acc);
            let offset = if MIN {
                half_at(block.as_ptr().add(2))
            } else {
                -8.0 * d
            };
            offsets += offset * x.sums[b];
        }
        hsum(acc) + offsets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u32) -> Vec<u32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                s >> 8
            })
            .collect()
    }

    /// A row of random blocks whose f16 scale and minimum are moderate finite numbers.
    fn random_row(dtype: DType, blocks: usize, seed: u32) -> Vec<u8> {
        let (_, block_bytes) = dtype.block();
        let mut bytes: Vec<u8> = pseudo_random(blocks * block_bytes, seed)
            .into_iter()
            .map(|v| v as u8)
            .collect();
        let numbers = pseudo_random(2 * blocks, seed + 1);
        for (b, block) in bytes.chunks_exact_mut(block_bytes).enumerate() {
            let scale = (numbers[2 * b] % 1000) as f32 / 1000.0 * 0.1;
            block[..2].copy_from_slice(&f16::from_f32(scale).to_le_bytes());
            if matches!(dtype, DType::Q4_1 | DType::Q5_1) {
                let min = (numbers[2 * b + 1] % 1000) as f32 / 1000.0 - 0.5;
                block[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
            }
        }
        bytes
    }

    #[test]
    fn integer_dot_products_equal_the_dequantized_ones_within_activation_rounding() {
        let blocks = 40;
        let x: Vec<f32> = pseudo_random(blocks * BLOCK, 7)
            .into_iter()
            .map(|v| v as f32 / (1u32 << 24) as f32 * 8.0 - 4.0)
            .collect();
        let quantized = QuantizedRow::new(&x);
        for dtype in [
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q5_0,
            DType::Q5_1,
        ] {
            let row = random_row(dtype, blocks, 11);
            let mut weights = vec![0.0; blocks * BLOCK];
            dequantize(dtype, &row, &mut weights);
            let exact: f32 = weights.iter().zip(&x).map(|(w, x)| w * x).sum();
            // Each activation moves by at most half its block's step.
            let bound: f32 = weights
                .chunks_exact(BLOCK)
                .zip(&quantized.scales)
                .map(|(w, s)| s / 2.0 * w.iter().map(|v| v.abs()).sum::<f32>())
                .sum();
            let got = dot(dtype, &row, &quantized);
            assert!(
                (got - exact).abs() <= bound * 1.001 + 1e-4,
                "{dtype}: {got} vs {exact} (bound {bound})"
            );
            let portable = dot_portable(dtype, &row, &quantized);
            assert!(
                (got - portable).abs() <= 1e-4 * portable.abs().max(1.0),
                "{dtype}: SIMD {got} vs portable {portable}"
            );
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
                let q = row.quants[b * BLOCK + i] as f32;
                assert!((q * scale - v).abs() <= scale / 2.0 + 1e-6);
            }
        }
    }
}
