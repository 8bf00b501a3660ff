//! How cached keys and values are stored: as f32, or in 8 bits per element with one f32
//! scale per token and head (int8, or fp8 e4m3). A cache layout owns [`KvStore`]s; attention
//! reads them as [`KvChunk`]s and widens each element as it goes, so a quantized cache is
//! never expanded to f32 in memory.

use std::borrow::Cow;
use std::ops::Range;

use crate::config::ModelConfig;

/// The element type of a KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    #[default]
    F32,
    /// Symmetric int8: `scale = max|x| / 127` per token and head.
    Int8,
    /// fp8 e4m3 with `scale = max|x| / 448` per token and head.
    Fp8E4M3,
}

impl KvDtype {
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Int8 => "int8",
            KvDtype::Fp8E4M3 => "fp8-e4m3",
        }
    }

    /// Bytes one token takes in `shape`, its scales included.
    pub fn token_bytes(self, shape: KvShape) -> usize {
        match self {
            KvDtype::F32 => 4 * shape.width(),
            KvDtype::Int8 | KvDtype::Fp8E4M3 => shape.width() + 4 * shape.heads,
        }
    }
}

/// One cached token: `heads` groups of `head_dim` elements, each quantized with its own scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// The key/value heads of `config`; latent attention caches one latent per token, one group.
    pub fn of(config: &ModelConfig) -> Self {
        match config.mla {
            Some(_) => KvShape {
                heads: 1,
                head_dim: config.kv_dim(),
            },
            None => KvShape {
                heads: config.num_kv_heads,
                head_dim: config.head_dim,
            },
        }
    }

    pub fn width(self) -> usize {
        self.heads * self.head_dim
    }
}

/// An fp8 e4m3 code as the OCP format (and torch's `float8_e4m3fn`) defines it: 1 sign bit,
/// 4 exponent bits of bias 7, 3 mantissa bits; no infinities, ±448 the largest finite value,
/// `S.1111.111` NaN.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct E4M3(pub u8);

impl E4M3 {
    pub const MAX: f32 = 448.0;

    /// Rounds to the nearest code, ties to even; beyond ±448 saturates.
    pub fn from_f32(x: f32) -> Self {
        let sign = ((x.to_bits() >> 24) & 0x80) as u8;
        let a = x.abs();
        let magnitude = if a.is_nan() {
            0x7F
        } else if a >= Self::MAX {
            0x7E
        } else if a < MIN_NORMAL {
            // Subnormal codes are multiples of 2⁻⁹, and the code is that multiple.
            (a * 512.0).round_ties_even() as u8
        } else {
            // Round f32's 23 mantissa bits to 3, ties to even; a carry moves to the exponent,
            // which is then rebiased from 127 to 7.
            let bits = a.to_bits();
            let rounded = (bits + 0x7_FFFF + ((bits >> 20) & 1)) >> 20;
            (rounded - (120 << 3)) as u8
        };
        E4M3(sign | magnitude)
    }

    #[inline(always)]
    pub fn to_f32(self) -> f32 {
        let magnitude = u32::from(self.0 & 0x7F);
        let value = if magnitude >= 8 {
            f32::from_bits((magnitude << 20) + (120 << 23))
        } else {
            magnitude as f32 / 512.0
        };
        let value = if magnitude == 0x7F { f32::NAN } else { value };
        if self.0 & 0x80 != 0 {
            -value
        } else {
            value
        }
    }
}

/// The smallest normal e4m3 magnitude, 2⁻⁶.
const MIN_NORMAL: f32 = 0.015625;

/// An element attention reads from a cache, widened to f32 as it is used.
pub trait KvElement: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
    /// The codes and per-token-and-head scales of `chunk`, if it holds this element type.
    fn of<'a>(chunk: &KvChunk<'a>) -> Option<(&'a [Self], &'a [f32])>;
}

impl KvElement for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    fn of<'a>(chunk: &KvChunk<'a>) -> Option<(&'a [f32], &'a [f32])> {
        match *chunk {
            KvChunk::F32(values) => Some((values, &[])),
            _ => None,
        }
    }
}

impl KvElement for i8 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from(self)
    }

    fn of<'a>(chunk: &KvChunk<'a>) -> Option<(&'a [i8], &'a [f32])> {
        match *chunk {
            KvChunk::Int8 { codes, scales } => Some((codes, scales)),
            _ => None,
        }
    }
}

impl KvElement for E4M3 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    fn of<'a>(chunk: &KvChunk<'a>) -> Option<(&'a [E4M3], &'a [f32])> {
        match *chunk {
            KvChunk::Fp8 { codes, scales } => Some((codes, scales)),
            _ => None,
        }
    }
}

/// Whole tokens of a cache, read in place: each token's `heads · head_dim` elements, and for
/// a quantized cache its `heads` scales.
#[derive(Clone, Copy, Debug)]
pub enum KvChunk<'a> {
    F32(&'a [f32]),
    Int8 {
        codes: &'a [i8],
        scales: &'a [f32],
    },
    Fp8 {
        codes: &'a [E4M3],
        scales: &'a [f32],
    },
}

impl<'a> KvChunk<'a> {
    pub const EMPTY: KvChunk<'static> = KvChunk::F32(&[]);

    /// The elements as f32: borrowed when they are f32, else widened and scaled.
    pub fn to_f32(&self, shape: KvShape) -> Cow<'a, [f32]> {
        fn widened<E: KvElement>(codes: &[E], scales: &[f32], head_dim: usize) -> Vec<f32> {
            codes
                .chunks(head_dim)
                .zip(scales)
                .flat_map(|(head, &scale)| head.iter().map(move |c| c.widen() * scale))
                .collect()
        }
        match *self {
            KvChunk::F32(values) => Cow::Borrowed(values),
            KvChunk::Int8 { codes, scales } => Cow::Owned(widened(codes, scales, shape.head_dim)),
            KvChunk::Fp8 { codes, scales } => Cow::Owned(widened(codes, scales, shape.head_dim)),
        }
    }
}

/// Slots for whole tokens of one shape and element type.
#[derive(Clone, Debug)]
pub struct KvStore {
    shape: KvShape,
    codes: Codes,
}

#[derive(Clone, Debug)]
enum Codes {
    F32(Vec<f32>),
    Int8(Vec<i8>, Vec<f32>),
    Fp8(Vec<E4M3>, Vec<f32>),
}

impl KvStore {
    /// `tokens` slots, zeroed.
    pub fn new(dtype: KvDtype, shape: KvShape, tokens: usize) -> Self {
        let (width, heads) = (tokens * shape.width(), tokens * shape.heads);
        let codes = match dtype {
            KvDtype::F32 => Codes::F32(vec![0.0; width]),
            KvDtype::Int8 => Codes::Int8(vec![0; width], vec![0.0; heads]),
            KvDtype::Fp8E4M3 => Codes::Fp8(vec![E4M3(0); width], vec![0.0; heads]),
        };
        KvStore { shape, codes }
    }

    pub fn tokens(&self) -> usize {
        let width = self.shape.width().max(1);
        match &self.codes {
            Codes::F32(values) => values.len() / width,
            Codes::Int8(codes, _) => codes.len() / width,
            Codes::Fp8(codes, _) => codes.len() / width,
        }
    }

    /// Grows (with zeroed slots) or shrinks to `tokens` slots.
    pub fn resize(&mut self, tokens: usize) {
        let (width, heads) = (tokens * self.shape.width(), tokens * self.shape.heads);
        match &mut self.codes {
            Codes::F32(values) => values.resize(width, 0.0),
            Codes::Int8(codes, scales) => {
                codes.resize(width, 0);
                scales.resize(heads, 0.0);
            }
            Codes::Fp8(codes, scales) => {
                codes.resize(width, E4M3(0));
                scales.resize(heads, 0.0);
            }
        }
    }

    /// Stores `row` (one token) in slot `slot`, quantizing each head with its own scale.
    pub fn write(&mut self, slot: usize, row: &[f32]) {
        let KvShape { heads, head_dim } = self.shape;
        let span = slot * heads * head_dim..(slot + 1) * heads * head_dim;
        let scales = slot * heads..(slot + 1) * heads;
        match &mut self.codes {
            Codes::F32(values) => values[span].copy_from_slice(row),
            Codes::Int8(codes, s) => quantize(
                row,
                head_dim,
                &mut codes[span],
                &mut s[scales],
                127.0,
                |x| x.round_ties_even().clamp(-127.0, 127.0) as i8,
            ),
            Codes::Fp8(codes, s) => quantize(
                row,
                head_dim,
                &mut codes[span],
                &mut s[scales],
                E4M3::MAX,
                E4M3::from_f32,
            ),
        }
    }

    /// Slots `tokens`, read in place.
    pub fn chunk(&self, tokens: Range<usize>) -> KvChunk<'_> {
        let (width, heads) = (self.shape.width(), self.shape.heads);
        let span = tokens.start * width..tokens.end * width;
        let scales = tokens.start * heads..tokens.end * heads;
        match &self.codes {
            Codes::F32(values) => KvChunk::F32(&values[span]),
            Codes::Int8(codes, s) => KvChunk::Int8 {
                codes: &codes[span],
                scales: &s[scales],
            },
            Codes::Fp8(codes, s) => KvChunk::Fp8 {
                codes: &codes[span],
                scales: &s[scales],
            },
        }
    }
}

/// Each `head_dim` run of `row` as codes of `encode(x / scale)`, `scale = max|x| / top`; an
/// all-zero head gets scale 0 and zero codes.
fn quantize<C: Copy + Default>(
    row: &[f32],
    head_dim: usize,
    codes: &mut [C],
    scales: &mut [f32],
    top: f32,
    encode: impl Fn(f32) -> C,
) {
    for ((head, out), scale) in row
        .chunks(head_dim)
        .zip(codes.chunks_mut(head_dim))
        .zip(scales)
    {
        let max = head.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        *scale = max / top;
        for (c, x) in out.iter_mut().zip(head) {
            *c = match max > 0.0 {
                true => encode(x / *scale),
                false => C::default(),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_round_trips_every_finite_code() {
        for code in 0..=255u8 {
            let value = E4M3(code).to_f32();
            if code & 0x7F == 0x7F {
                assert!(value.is_nan());
                continue;
            }
            assert_eq!(E4M3::from_f32(value), E4M3(code), "{code:#x} ({value})");
        }
        assert_eq!(E4M3(0x7E).to_f32(), 448.0);
        assert_eq!(E4M3(0x01).to_f32(), 2f32.powi(-9));
        assert_eq!(E4M3::from_f32(1e6), E4M3(0x7E));
        assert_eq!(E4M3::from_f32(-1e6), E4M3(0xFE));
    }

    #[test]
    fn e4m3_codes_match_torch_float8_e4m3fn() {
        #[derive(serde::Deserialize)]
        struct Vectors {
            values: Vec<f32>,
            codes: Vec<u8>,
        }
        // `make_kv_quant_fixtures.py`: spread values, ties between codes, the range's edges (torch
        // saturates beyond ±448, as vibee does).
        let vectors: Vectors =
            serde_json::from_str(include_str!("../../../../tests/fixtures/e4m3.json")).unwrap();
        for (value, code) in vectors.values.iter().zip(&vectors.codes) {
            assert_eq!(E4M3::from_f32(*value), E4M3(*code), "{value}");
        }
    }

    #[test]
    fn int8_heads_keep_their_own_scale_and_lose_at_most_half_a_step() {
        let shape = KvShape {
            heads: 2,
            head_dim: 4,
        };
        let mut store = KvStore::new(KvDtype::Int8, shape, 2);
        let row = [0.5, -1.0, 0.25, 0.0, 100.0, -3.0, 7.0, 50.0];
        store.write(1, &row);
        store.write(0, &[0.0; 8]);
        let KvChunk::Int8 { codes, scales } = store.chunk(1..2) else {
            panic!("an int8 store reads as int8");
        };
        assert_eq!(scales, &[1.0 / 127.0, 100.0 / 127.0]);
        assert_eq!(&codes[..4], &[64, -127, 32, 0]);
        let back = store.chunk(0..2).to_f32(shape);
        assert!(back[..8].iter().all(|v| *v == 0.0));
        for (i, x) in row.iter().enumerate() {
            let step = scales[i / 4];
            assert!(
                (x - back[8 + i]).abs() <= step / 2.0 + 1e-6,
                "{x} -> {}",
                back[8 + i]
            );
        }
    }
}
