//! v2344 `hqq`: half-quadratic quantization (Badri & Shaji, 2023), calibration-free int4.
//! Each group of `group` weights along a row (64 by default; `--plugin-config hqq=group=N`
//! with N 32, 64 or 128) starts from min–max scaling, `q = round(w · s + z)` in 0–15; then the
//! float zero points `z` are refined by a proximal solver of `‖w − (q − z) / s‖ₚᵖ` with
//! p = 0.7 (shrink the residual, refit `z` as the mean of what remains), tensor by tensor, for
//! up to 20 rounds while the mean absolute error keeps falling, as the `hqq` package does by
//! default. The weights then run on the packed 4-bit kernels as `w = q / s − z / s`.
//!
//! Checkpoints stored by the `hqq` package (its `HQQLinear` state dict in safetensors, as
//! `vibee quantize --method hqq` also writes them) load as they are. Each layer holds `W_q`
//! (4 bits: u8 `[n/2, group]`, group `p` in the high nibbles and group `p + n/2` in the low
//! ones, for the `n = out · in / group` groups taken row by row; 8 bits: `[n, group]`),
//! `scale` and `zero` `[n, 1]` (`w = (q − zero) · scale`) and its settings as small tensors
//! (integers, flags as u8, strings as u8 character codes).

use anyhow::{bail, ensure, Context};
use rayon::prelude::*;
use vibee_core::backend::Backend;
use vibee_core::config::ModelConfig;
use vibee_core::io::weights::{DType, Weight, Weights};
use vibee_core::model::ops::{BuildContext, Factory, Linear, Operator, Quantization};
use vibee_core::{App, Plugin, PluginSpec};

use super::integer::{check_finite, IntegerWeights, StoredTensor};
use super::{configured_group, whole_blocks, StoredLayout};

/// The p of the ℓp norm the solver minimises, its shrinkage strength and its rounds.
const LP_NORM: f32 = 0.7;
const BETA: f32 = 10.0;
const ROUNDS: usize = 20;

pub struct Hqq;

#[derive(Clone)]
struct HalfQuadratic {
    group: usize,
}

impl Plugin for Hqq {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2344",
            name: "hqq",
        }
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        let group = configured_group(app, "hqq", 64)?;
        app.register_operator(Operator::Quantization(std::sync::Arc::new(HalfQuadratic {
            group,
        })));
        Ok(())
    }
}

/// Quantizes full-precision checkpoints while loading, and reads checkpoints stored by HQQ.
impl Factory<dyn Quantization> for HalfQuadratic {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match config.quantization {
            None | Some("hqq") => Ok(()),
            Some(stored) => Err(format!(
                "the checkpoint is stored quantized (needs `{stored}`); hqq quantizes full-precision weights or reads HQQ checkpoints"
            )),
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Quantization>> {
        Ok(if cx.config.quantization == Some("hqq") {
            // Each layer stores its own group size beside its tensors.
            Box::new(StoredLayout {
                method: "hqq",
                marker: "W_q",
                read,
                group_size: None,
            })
        } else {
            Box::new(self.clone())
        })
    }
}

/// One group's inverse scale and zero point: `q = round(w · scale + zero)`.
#[derive(Clone, Copy)]
struct Group {
    scale: f32,
    zero: f32,
}

impl Group {
    fn quantize(self, w: f32) -> f32 {
        (w * self.scale + self.zero)
            .round_ties_even()
            .clamp(0.0, 15.0)
    }
}

/// Below this magnitude the proximal step is exactly zero (`|x| < |x|^(p−1) / β` up to
/// `β^(−1/(2−p))` ≈ 0.17), so the power need not be taken: quantization residuals almost
/// always are.
const SHRINK_FLOOR: f32 = 0.1;

/// `sign(x) · max(|x| − |x|^(p−1) / β, 0)`: the proximal step of the ℓp penalty.
fn shrink(x: f32) -> f32 {
    let magnitude = x.abs();
    if magnitude < SHRINK_FLOOR {
        return 0.0;
    }
    (magnitude - magnitude.powf(LP_NORM - 1.0) / BETA).max(0.0) * x.signum()
}

/// The groups of all of `values` (the whole tensor, row-major), after the solver.
fn solve(values: &[f32], group: usize) -> Vec<Group> {
    let mut groups: Vec<Group> = values
        .par_chunks_exact(group)
        .map(|w| {
            let min = w.iter().copied().fold(f32::INFINITY, f32::min);
            let max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let range = max - min;
            let scale = if range.abs() <= 1e-4 {
                1.0
            } else {
                15.0 / range
            };
            let scale = scale.min(2e4);
            Group {
                scale,
                zero: -min * scale,
            }
        })
        .collect();
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        // Each group's refitted zero point and its summed absolute error. The error is summed
        // in f64: late rounds improve the mean by ~1e-5 of itself, about what a running f32
        // sum over millions of weights drifts, and the stopping test compares those means.
        let (refit, errors): (Vec<f32>, Vec<f64>) = values
            .par_chunks_exact(group)
            .zip(&groups)
            .map(|(w, g)| {
                let (mut zero, mut error) = (0.0f32, 0.0f64);
                for &w in w {
                    let q = g.quantize(w);
                    let restored = (q - g.zero) / g.scale;
                    error += (w - restored).abs() as f64;
                    zero += q - (w - shrink(w - restored)) * g.scale;
                }
                (zero / w.len() as f32, error)
            })
            .unzip();
        let error = errors.iter().sum::<f64>() / values.len() as f64;
        for (g, zero) in groups.iter_mut().zip(refit) {
            g.zero = zero;
        }
        if error < best {
            best = error;
        } else {
            break;
        }
    }
    groups
}

/// Where HQQ's group `r` (row-major over the weight: row `r / per_row`, its group
/// `r % per_row`) sits in [`IntegerWeights`]' `[groups, out]` scales and zero points.
fn layer_index(r: usize, per_row: usize, out: usize) -> usize {
    (r % per_row) * out + r / per_row
}

/// `weight` (`[out, in]` row-major) quantized to 4 bits in groups of `group` along each row.
pub fn quantize(weight: &[f32], out: usize, inp: usize, group: usize) -> IntegerWeights {
    let groups = solve(weight, group);
    let per_row = inp / group;
    let mut layer = IntegerWeights::zeroed(4, out, inp, group);
    for ((r, (w, q)), g) in weight
        .chunks_exact(group)
        .zip(layer.quants.chunks_exact_mut(group))
        .enumerate()
        .zip(&groups)
    {
        let at = layer_index(r, per_row, out);
        (layer.scales[at], layer.zeros[at]) = (1.0 / g.scale, g.zero);
        for (q, w) in q.iter_mut().zip(w) {
            *q = g.quantize(*w) as u8;
        }
    }
    layer
}

impl Quantization for HalfQuadratic {
    fn linear(
        &self,
        backend: &dyn Backend,
        name: &str,
        weight: Weight,
    ) -> anyhow::Result<Box<dyn Linear>> {
        whole_blocks(name, &weight, self.group)?;
        let (out, inp) = (weight.shape[0], weight.shape[1]);
        quantize(&weight.to_f32_vec(), out, inp, self.group).into_linear(backend, name)
    }
}

/// A layer's HQQ settings, read from its small tensors.
struct Settings<'a> {
    weights: &'a Weights,
    prefix: &'a str,
}

impl Settings<'_> {
    fn name(&self, key: &str) -> String {
        format!("{}.{key}", self.prefix)
    }

    /// A 0-d integer (`nbits`, `group_size`, `axis`: int32).
    fn integer(&self, key: &str) -> anyhow::Result<i64> {
        match self.weights.raw(&self.name(key), "I32")? {
            (bytes, []) => Ok(i32::from_le_bytes(bytes.try_into()?) as i64),
            (_, shape) => bail!("`{key}` has shape {shape:?}, expected a scalar"),
        }
    }

    /// A 0-d u8 flag; `default` when the layer does not store it.
    fn flag(&self, key: &str, default: bool) -> anyhow::Result<bool> {
        if !self.weights.contains(&self.name(key)) {
            return Ok(default);
        }
        match self.weights.raw(&self.name(key), "U8")? {
            ([value], []) => Ok(*value != 0),
            (_, shape) => bail!("`{key}` has shape {shape:?}, expected a scalar"),
        }
    }

    /// A string stored as u8 character codes.
    fn text(&self, key: &str) -> anyhow::Result<String> {
        let (bytes, _) = self.weights.raw(&self.name(key), "U8")?;
        Ok(bytes.iter().map(|b| *b as char).collect())
    }

    /// `shape`: the weight's `[out, in]` as int64.
    fn shape(&self) -> anyhow::Result<Vec<i64>> {
        let (bytes, _) = self.weights.raw(&self.name("shape"), "I64")?;
        Ok(bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("chunks of 8")))
            .collect())
    }
}

/// The layer `prefix` (`[out, in]`) from the `hqq` package's tensors.
pub fn read(
    weights: &Weights,
    prefix: &str,
    out: usize,
    inp: usize,
) -> anyhow::Result<IntegerWeights> {
    let settings = Settings { weights, prefix };
    let shape = settings.shape()?;
    ensure!(
        shape == [out as i64, inp as i64],
        "`shape` says {shape:?}, but the config implies [{out}, {inp}]"
    );
    for (key, refusal) in [
        ("view_as_float", "packed quants stored viewed as floats"),
        ("quant_scale", "quantized scales"),
        ("quant_zero", "quantized zero points"),
        ("offload_meta", "offloaded scales and zero points"),
    ] {
        if settings.flag(key, false)? {
            bail!("HQQ layers with {key} ({refusal}) are not supported");
        }
    }
    ensure!(
        settings.flag("channel_wise", true)?,
        "HQQ layers with one scale for the whole tensor (channel_wise false) are not supported"
    );
    let axis = settings.integer("axis")?;
    ensure!(
        axis == 1,
        "HQQ axis {axis} is not supported: vibee's kernels need groups along the input features (axis 1, the default of transformers' HqqConfig)"
    );
    let bits = settings.integer("nbits")?;
    let packing = settings.text("packing")?;
    ensure!(
        matches!((bits, packing.as_str()), (4, "4bit_u8") | (8, "8bit_u8")),
        "HQQ {bits}-bit weights packed as `{packing}` are not supported (4bit_u8 or 8bit_u8)"
    );
    let group = settings.integer("group_size")?;
    ensure!(
        group > 0 && inp.is_multiple_of(group as usize),
        "a group size of {group} does not divide {inp} input features"
    );
    let group = group as usize;
    let groups = out
        .checked_mul(inp)
        .with_context(|| format!("a [{out}, {inp}] layer has more weights than memory can hold"))?
        / group;
    let finite = |key: &str| -> anyhow::Result<Vec<f32>> {
        let name = settings.name(key);
        let values = weights.get(&name, &[groups, 1])?.to_f32_vec();
        check_finite(&name, &values)?;
        Ok(values)
    };
    let (scale, zero) = (finite("scale")?, finite("zero")?);
    let (packed, packed_shape) = weights.raw(&settings.name("W_q"), "U8")?;
    ensure!(
        bits == 8 || groups.is_multiple_of(2),
        "4-bit HQQ packs groups in pairs, but the layer has {groups}"
    );
    let rows = if bits == 4 { groups / 2 } else { groups };
    ensure!(
        packed_shape == [rows, group],
        "W_q has shape {packed_shape:?}, expected [{rows}, {group}]"
    );
    // Group r (row-major over the weight) is held by packed row r, or by the high (first half)
    // or low (second half) nibbles of packed row r mod n/2.
    let mut by_group = vec![0u8; out * inp];
    if bits == 4 {
        let (high, low) = by_group.split_at_mut(rows * group);
        for ((p, h), l) in packed.iter().zip(high).zip(low) {
            (*h, *l) = (p >> 4, p & 0xF);
        }
    } else {
        by_group.copy_from_slice(packed);
    }
    let per_row = inp / group;
    let transpose = |values: Vec<f32>| {
        let mut by_column = vec![0.0; values.len()];
        for (r, v) in values.into_iter().enumerate() {
            by_column[layer_index(r, per_row, out)] = v;
        }
        by_column
    };
    Ok(IntegerWeights {
        bits: bits as u32,
        out,
        inp,
        quants: by_group,
        group_of: IntegerWeights::sequential_groups(inp, group),
        scales: transpose(scale),
        zeros: transpose(zero),
    })
}

/// The `hqq` package's tensors of a 4-bit layer quantized with groups in order; scales and
/// zero points in `dtype` (the model's, HQQ's compute dtype).
pub fn write(
    layer: &IntegerWeights,
    prefix: &str,
    dtype: DType,
) -> anyhow::Result<Vec<StoredTensor>> {
    let (out, inp, per_row) = (layer.out, layer.inp, layer.groups());
    let group = inp / per_row;
    let groups = out * per_row;
    ensure!(
        layer.bits == 4 && layer.group_of.is_sorted() && groups.is_multiple_of(2),
        "the HQQ layout holds 4-bit weights in an even number of groups, in order"
    );
    let half = groups / 2 * group;
    let (high, low) = layer.quants.split_at(half);
    let packed: Vec<u8> = high.iter().zip(low).map(|(h, l)| h << 4 | l).collect();
    let by_row = |values: &[f32]| -> Vec<f32> {
        (0..groups)
            .map(|r| values[layer_index(r, per_row, out)])
            .collect()
    };
    let compute_dtype = match dtype {
        DType::F16 => "torch.float16",
        DType::BF16 => "torch.bfloat16",
        _ => "torch.float32",
    };
    let name = |key: &str| format!("{prefix}.{key}");
    let scalar = |key: &str, value: i32| {
        StoredTensor::raw(
            name(key),
            safetensors::Dtype::I32,
            vec![],
            value.to_le_bytes(),
        )
    };
    let flag = |key: &str, value: bool| {
        StoredTensor::raw(name(key), safetensors::Dtype::U8, vec![], [value as u8])
    };
    let text = |key: &str, value: &str| {
        StoredTensor::raw(
            name(key),
            safetensors::Dtype::U8,
            vec![value.len()],
            value.bytes(),
        )
    };
    let shape = [out as i64, inp as i64]
        .into_iter()
        .flat_map(i64::to_le_bytes);
    Ok(vec![
        StoredTensor::raw(
            name("W_q"),
            safetensors::Dtype::U8,
            vec![groups / 2, group],
            packed,
        ),
        StoredTensor::float(
            name("scale"),
            dtype,
            vec![groups, 1],
            &by_row(&layer.scales),
        ),
        StoredTensor::float(name("zero"), dtype, vec![groups, 1], &by_row(&layer.zeros)),
        StoredTensor::raw(name("shape"), safetensors::Dtype::I64, vec![2], shape),
        scalar("nbits", 4),
        scalar("group_size", group as i32),
        scalar("axis", 1),
        text("packing", "4bit_u8"),
        text("unpack_view_dtype", "torch.uint8"),
        text("compute_dtype", compute_dtype),
        flag("view_as_float", false),
        flag("quant_scale", false),
        flag("quant_zero", false),
        flag("offload_meta", false),
        flag("encoded_state_dict", true),
        flag("stores_quant_config", true),
        flag("channel_wise", true),
        flag("optimize", true),
        flag("round_zero", false),
    ])
}
