//! v2341 `q4`: group-wise asymmetric int4 with zero points, as AutoAWQ and GPTQ store it:
//! each group of `group` weights along a row (32, 64 or 128; `--plugin-config q4=group=64`,
//! 128 by default) gets `scale = (max − min) / 15` and the integer zero point
//! `z = clamp(−round(min / scale), 0, 15)`, and each weight `q = clamp(round(w / scale) + z,
//! 0, 15)`, so `w ≈ scale · (q − z)`. Decode runs the packed 4-bit SIMD kernels.

use vibee_core::backend::quant::packed::{Bits, PackedMatrix};
use vibee_core::backend::{Backend, LinearWeight};
use vibee_core::io::weights::Weight;
use vibee_core::model::ops::{Linear, Quantization};
use vibee_core::{App, Plugin, PluginSpec};

use super::{configured_group, register, whole_blocks};

pub struct Q4;

/// The quantizer with its group size.
#[derive(Clone)]
struct GroupWise {
    group: usize,
}

impl Plugin for Q4 {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2341",
            name: "q4",
        }
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        let group = configured_group(app, "q4", 128)?;
        register(app, "q4", GroupWise { group });
        Ok(())
    }
}

impl Quantization for GroupWise {
    fn linear(
        &self,
        backend: &dyn Backend,
        name: &str,
        weight: Weight,
    ) -> anyhow::Result<Box<dyn Linear>> {
        whole_blocks(name, &weight, self.group)?;
        let blocks_per_group = self.group / 32;
        let packed = PackedMatrix::quantize(&weight, Bits::Four, true, |_, row, blocks| {
            for (values, blocks) in row
                .chunks_exact(self.group)
                .zip(blocks.chunks_exact_mut(blocks_per_group))
            {
                let max = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let min = values.iter().copied().fold(f32::INFINITY, f32::min);
                let scale = (max - min).max(1e-5) / 15.0;
                let zero = (-(min / scale).round_ties_even()).clamp(0.0, 15.0);
                for (block, values) in blocks.iter_mut().zip(values.chunks_exact(32)) {
                    block.scale = scale;
                    block.min = -scale * zero;
                    for (q, v) in block.quants.iter_mut().zip(values) {
                        *q = ((v / scale).round_ties_even() + zero).clamp(0.0, 15.0) as i8;
                    }
                }
            }
        });
        Ok(backend.linear(LinearWeight::Packed(packed)))
    }
}
