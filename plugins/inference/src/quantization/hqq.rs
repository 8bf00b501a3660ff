//! v2344 `hqq`: half-quadratic quantization (Badri & Shaji, 2023), calibration-free int4.
//! Each group of `group` weights along a row (64 by default; `--plugin-config hqq=group=N`
//! with N 32, 64 or 128) starts from min–max scaling, `q = round(w · s + z)` in 0–15; then the
//! float zero points `z` are refined by a proximal solver of `‖w − (q − z) / s‖ₚᵖ` with
//! p = 0.7 (shrink the residual, refit `z` as the mean of what remains), tensor by tensor, for
//! up to 20 rounds while the mean absolute error keeps falling, as the `hqq` package does by
//! default. The weights then run on the packed 4-bit kernels as `w = q / s − z / s`.

use rayon::prelude::*;
use vibee_core::ops::{Linear, Quantization};
use vibee_core::quant::packed::{Bits, PackedLinear, PackedMatrix};
use vibee_core::weights::Weight;
use vibee_core::{App, Plugin, PluginSpec};

use super::{configured_group, register, whole_blocks};

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
        register(app, "hqq", HalfQuadratic { group });
        Ok(())
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

/// `sign(x) · max(|x| − |x|^(p−1) / β, 0)`: the proximal step of the ℓp penalty.
fn shrink(x: f32) -> f32 {
    let magnitude = x.abs();
    (magnitude - magnitude.powf(LP_NORM - 1.0) / BETA).max(0.0) * x.signum()
}

impl HalfQuadratic {
    /// The groups of all of `values` (the whole tensor, row-major), after the solver.
    fn solve(&self, values: &[f32]) -> Vec<Group> {
        let mut groups: Vec<Group> = values
            .par_chunks_exact(self.group)
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
        let mut best = f32::INFINITY;
        for _ in 0..ROUNDS {
            // Each group's refitted zero point and its summed absolute error.
            let (refit, errors): (Vec<f32>, Vec<f32>) = values
                .par_chunks_exact(self.group)
                .zip(&groups)
                .map(|(w, g)| {
                    let (mut zero, mut error) = (0.0f32, 0.0f32);
                    for &w in w {
                        let q = g.quantize(w);
                        let restored = (q - g.zero) / g.scale;
                        error += (w - restored).abs();
                        zero += q - (w - shrink(w - restored)) * g.scale;
                    }
                    (zero / w.len() as f32, error)
                })
                .unzip();
            let error = errors.iter().sum::<f32>() / values.len() as f32;
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
}

impl Quantization for HalfQuadratic {
    fn linear(&self, name: &str, weight: Weight) -> anyhow::Result<Box<dyn Linear>> {
        whole_blocks(name, &weight, self.group)?;
        let (rows, cols) = (weight.shape[0], weight.shape[1]);
        let mut values = vec![0.0f32; rows * cols];
        for (r, row) in values.chunks_exact_mut(cols).enumerate() {
            weight.row_to_f32(r, row);
        }
        let groups = self.solve(&values);
        let per_row = cols / self.group;
        let blocks_per_group = self.group / 32;
        let packed = PackedMatrix::quantize(&weight, Bits::Four, true, |r, row, blocks| {
            for ((w, blocks), g) in row
                .chunks_exact(self.group)
                .zip(blocks.chunks_exact_mut(blocks_per_group))
                .zip(&groups[r * per_row..(r + 1) * per_row])
            {
                for (block, w) in blocks.iter_mut().zip(w.chunks_exact(32)) {
                    block.scale = 1.0 / g.scale;
                    block.min = -g.zero / g.scale;
                    for (q, w) in block.quants.iter_mut().zip(w) {
                        *q = g.quantize(*w) as i8;
                    }
                }
            }
        });
        Ok(Box::new(PackedLinear(packed)))
    }
}
