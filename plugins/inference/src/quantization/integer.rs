//! Group-wise integer weights with zero points, the form AutoAWQ, GPTQ and HQQ checkpoints
//! store (each in its own packing): `weight[o][i] = scale[g][o] · (quant[o][i] − zero[g][o])`
//! with `g = group_of[i]`. AutoAWQ's and GPTQ's zero points are integers, HQQ's are not.
//! Loaders unpack into it, `vibee quantize` produces it, and it becomes a packed matrix for the
//! SIMD kernels.

use anyhow::{bail, ensure};
use half::{bf16, f16};
use vibee_core::backend::quant::packed::{Bits, PackedMatrix, QuantBlock};
use vibee_core::backend::tensor::Matrix;
use vibee_core::backend::{Backend, LinearWeight};
use vibee_core::io::weights::{DType, Weights};
use vibee_core::model::ops::Linear;

const BLOCK: usize = 32;

pub struct IntegerWeights {
    /// 4 or 8.
    pub bits: u32,
    pub out: usize,
    pub inp: usize,
    /// `[out, in]`, unsigned (below `2^bits`).
    pub quants: Vec<u8>,
    /// The group of each input column (GPTQ's `g_idx`; `i / group_size` without act-order).
    pub group_of: Vec<u32>,
    /// `[groups, out]`.
    pub scales: Vec<f32>,
    /// `[groups, out]`: whole numbers for AutoAWQ and GPTQ (whose v1 layout can hold `2^bits`,
    /// a stored −1), floats for HQQ.
    pub zeros: Vec<f32>,
}

/// The scale and zero point of one group under asymmetric min–max quantization to `bits`:
/// `scale = (max − min) / maxq` rounded to f16 (as stored), `zero = clamp(−round(min / scale),
/// 0, maxq)`. GPTQ widens the range to include 0 (`with_zero`), AutoAWQ does not.
pub fn min_max_group(values: &[f32], bits: u32, with_zero: bool) -> (f32, f32) {
    let maxq = ((1 << bits) - 1) as f32;
    let start = if with_zero { 0.0 } else { values[0] };
    let max = values.iter().copied().fold(start, f32::max);
    let min = values.iter().copied().fold(start, f32::min);
    let scale = f16::from_f32((max - min).max(1e-5) / maxq).to_f32();
    let zero = (-(min / scale).round_ties_even()).clamp(0.0, maxq);
    (scale, zero)
}

/// `value` quantized with `scale` and `zero` to `bits`.
pub fn quantize_value(value: f32, scale: f32, zero: f32, bits: u32) -> u8 {
    let maxq = ((1 << bits) - 1) as f32;
    ((value / scale).round_ties_even() + zero).clamp(0.0, maxq) as u8
}

/// `values` (one group) quantized to `bits` with [`min_max_group`] and dequantized into `out`.
pub fn round_trip(values: &[f32], bits: u32, with_zero: bool, out: &mut [f32]) {
    let (scale, zero) = min_max_group(values, bits, with_zero);
    for (o, v) in out.iter_mut().zip(values) {
        *o = scale * (quantize_value(*v, scale, zero, bits) as f32 - zero);
    }
}

/// Refuses a tensor of scales or zero points holding NaN or an infinity: the layer would
/// load, and every output it computes would be garbage.
pub fn check_finite(name: &str, values: &[f32]) -> anyhow::Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(at) => bail!(
            "`{name}` holds {} at element {at}: scales and zero points must be finite numbers",
            values[at]
        ),
        None => Ok(()),
    }
}

/// The number of groups a packed layer's `scales` tensor (`[groups, out]`) holds.
pub fn scale_groups(weights: &Weights, name: &str) -> anyhow::Result<usize> {
    match weights.shape(name)? {
        [groups, _] if *groups > 0 => Ok(*groups),
        shape => bail!("`{name}` has shape {shape:?}, expected [groups, out features]"),
    }
}

impl IntegerWeights {
    pub fn groups(&self) -> usize {
        self.scales.len() / self.out
    }

    /// A layer of zeros in groups of `group` consecutive input columns, to be filled in.
    pub fn zeroed(bits: u32, out: usize, inp: usize, group: usize) -> Self {
        let groups = inp / group;
        Self {
            bits,
            out,
            inp,
            quants: vec![0; out * inp],
            group_of: Self::sequential_groups(inp, group),
            scales: vec![0.0; groups * out],
            zeros: vec![0.0; groups * out],
        }
    }

    /// The groups of `group` consecutive input columns (no act-order).
    pub fn sequential_groups(inp: usize, group: usize) -> Vec<u32> {
        (0..inp).map(|i| (i / group) as u32).collect()
    }

    /// `weight` (`[out, in]` row-major) rounded to nearest, group by group along each row,
    /// with [`min_max_group`]'s scales and zero points.
    pub fn round_to_nearest(
        weight: &[f32],
        out: usize,
        inp: usize,
        bits: u32,
        group: usize,
        with_zero: bool,
    ) -> Self {
        let mut layer = Self::zeroed(bits, out, inp, group);
        for (r, row) in weight.chunks_exact(inp).enumerate() {
            for (g, values) in row.chunks_exact(group).enumerate() {
                let (scale, zero) = min_max_group(values, bits, with_zero);
                (layer.scales[g * out + r], layer.zeros[g * out + r]) = (scale, zero);
                for (k, v) in values.iter().enumerate() {
                    layer.quants[r * inp + g * group + k] = quantize_value(*v, scale, zero, bits);
                }
            }
        }
        layer
    }

    /// Checks the shapes and the groups `g_idx` names (a loader's last line of defence).
    fn validate(&self, name: &str) -> anyhow::Result<()> {
        let groups = self.groups();
        ensure!(
            self.quants.len() == self.out * self.inp
                && self.group_of.len() == self.inp
                && self.zeros.len() == self.scales.len()
                && groups * self.out == self.scales.len(),
            "`{name}`: packed tensors disagree on the layer's shape"
        );
        if let Some(g) = self.group_of.iter().find(|g| **g as usize >= groups) {
            bail!("`{name}`: g_idx names group {g}, but there are {groups}");
        }
        ensure!(
            self.inp.is_multiple_of(BLOCK),
            "`{name}` has {} input features, not a multiple of {BLOCK}",
            self.inp
        );
        Ok(())
    }

    /// The input columns sorted by group (stable), or `None` when groups already run in
    /// order: act-order checkpoints quantize columns in a permuted order.
    fn column_order(&self) -> Option<Vec<u32>> {
        if self.group_of.is_sorted() {
            return None;
        }
        let mut order: Vec<u32> = (0..self.inp as u32).collect();
        order.sort_by_key(|i| self.group_of[*i as usize]);
        Some(order)
    }

    /// The layer for the SIMD kernels: blocks of 32 columns (in group order) with the group's
    /// scale and `min = −scale · zero`; 8-bit quants move to signed storage.
    pub fn into_linear(self, backend: &dyn Backend, name: &str) -> anyhow::Result<Box<dyn Linear>> {
        self.validate(name)?;
        let order = self.column_order();
        let column = |j: usize| order.as_ref().map_or(j, |o| o[j] as usize);
        for b in 0..self.inp / BLOCK {
            let group = self.group_of[column(b * BLOCK)];
            if (1..BLOCK).any(|k| self.group_of[column(b * BLOCK + k)] != group) {
                bail!("`{name}`: a run of 32 input columns spans two quantization groups");
            }
        }
        let (bits, centre) = match self.bits {
            4 => (Bits::Four, 0.0),
            8 => (Bits::Eight, 128.0),
            other => bail!("`{name}`: {other}-bit weights are not supported (4 or 8)"),
        };
        // Symmetric 8-bit layers (zero point 128 everywhere) need no minimums: fewer bytes.
        let asymmetric = self.zeros.iter().any(|z| *z != centre);
        let packed =
            PackedMatrix::from_blocks(bits, self.out, self.inp, asymmetric, |o, blocks| {
                for (b, block) in blocks.iter_mut().enumerate() {
                    let g = self.group_of[column(b * BLOCK)] as usize * self.out + o;
                    let (scale, zero) = (self.scales[g], self.zeros[g]);
                    *block = QuantBlock {
                        quants: std::array::from_fn(|k| {
                            (self.quants[o * self.inp + column(b * BLOCK + k)] as f32 - centre)
                                as i8
                        }),
                        scale,
                        min: scale * (centre - zero),
                    };
                }
            });
        // Scales that are f16 values (AutoAWQ and GPTQ store f16) are kept so: fewer bytes.
        let exact = self.scales.iter().all(|s| f16::from_f32(*s).to_f32() == *s);
        let linear = backend.linear(LinearWeight::Packed(if exact {
            packed.with_half_scales()
        } else {
            packed
        }));
        Ok(match order {
            None => linear,
            Some(order) => Box::new(PermutedInput { order, linear }),
        })
    }
}

/// A packed layer whose columns were sorted by group: inputs are permuted the same way.
struct PermutedInput {
    order: Vec<u32>,
    linear: Box<dyn Linear>,
}

impl Linear for PermutedInput {
    fn forward(&self, x: &Matrix) -> Matrix {
        let mut permuted = Matrix::zeros(x.rows, x.cols);
        for (to, from) in permuted.rows_iter_mut().zip(x.rows_iter()) {
            for (t, i) in to.iter_mut().zip(&self.order) {
                *t = from[*i as usize];
            }
        }
        self.linear.forward(&permuted)
    }

    fn weight_bytes(&self) -> usize {
        self.linear.weight_bytes()
    }
}

/// A tensor of a quantized checkpoint being written.
pub struct StoredTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl StoredTensor {
    pub fn raw(
        name: String,
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        bytes: impl IntoIterator<Item = u8>,
    ) -> Self {
        Self {
            name,
            dtype,
            shape,
            bytes: bytes.into_iter().collect(),
        }
    }

    pub fn int32(name: String, shape: Vec<usize>, words: &[u32]) -> Self {
        let bytes = words.iter().flat_map(|w| w.to_le_bytes());
        Self::raw(name, safetensors::Dtype::I32, shape, bytes)
    }

    pub fn f16(name: String, shape: Vec<usize>, values: &[f32]) -> Self {
        Self::float(name, DType::F16, shape, values)
    }

    /// `values` stored as the float type `dtype`.
    pub fn float(name: String, dtype: DType, shape: Vec<usize>, values: &[f32]) -> Self {
        let (dtype, bytes) = match dtype {
            DType::F16 => (
                safetensors::Dtype::F16,
                values
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                safetensors::Dtype::BF16,
                values
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            _ => (
                safetensors::Dtype::F32,
                values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        };
        Self {
            name,
            dtype,
            shape,
            bytes,
        }
    }
}
