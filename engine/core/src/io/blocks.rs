//! Tensor element types, and GGUF's block formats: decoding every block-quantized type to f32,
//! and llama.cpp's reference Q8_0 and Q4_0 quantizers.

use std::fmt;

use half::{bf16, f16};

/// Elements per block of the 32-element types and of quantized activations.
pub const BLOCK: usize = 32;

/// A weight's element type: plain floats, or one of llama.cpp's block-quantized types (GGUF),
/// whose rows are sequences of fixed-size blocks, each holding its own scale(s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl DType {
    /// The type with GGML number `id` (as GGUF files store it).
    pub fn from_ggml(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// Elements per block and bytes per block (1 element for the float types).
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (256, 84),
            Self::Q3K => (256, 110),
            Self::Q4K => (256, 144),
            Self::Q5K => (256, 176),
            Self::Q6K => (256, 210),
        }
    }

    pub fn is_quantized(self) -> bool {
        !matches!(self, Self::F32 | Self::F16 | Self::BF16)
    }

    /// Bytes of `elements` elements, or `None` when they do not fill whole blocks.
    pub fn bytes_for(self, elements: usize) -> Option<usize> {
        let (per_block, block_bytes) = self.block();
        elements
            .is_multiple_of(per_block)
            .then(|| elements / per_block * block_bytes)
    }

    /// The alignment the kernels need: element size for floats; blocks are read bytewise.
    pub(crate) fn alignment(self) -> usize {
        if self.is_quantized() {
            1
        } else {
            self.block().1
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q5_0 => "q5_0",
            DType::Q5_1 => "q5_1",
            DType::Q2K => "q2_k",
            DType::Q3K => "q3_k",
            DType::Q4K => "q4_k",
            DType::Q5K => "q5_k",
            DType::Q6K => "q6_k",
        })
    }
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
pub(crate) fn unpack(dtype: DType, block: &[u8], values: &mut [i8; BLOCK]) -> (f32, f32) {
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
