//! v2340 `int8`: weight-only int8, symmetric, one scale per output channel. Each row of every
//! projection is divided by `max |w| / 127` and rounded to nearest (ties to even) when the
//! model loads; decode multiplies the int8 weights by int8 activations (one scale per 32
//! activations) with the packed SIMD kernels, prefill widens them for the GEMM.

use vibee_core::backend::quant::packed::{Bits, PackedMatrix};
use vibee_core::backend::{Backend, LinearWeight};
use vibee_core::io::weights::Weight;
use vibee_core::model::ops::{Linear, Quantization};
use vibee_core::{App, Plugin, PluginSpec};

use super::{register, whole_blocks};

pub struct Int8;

/// The scheme itself.
#[derive(Clone)]
struct PerChannel;

impl Plugin for Int8 {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2340",
            name: "int8",
        }
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        register(app, "int8", PerChannel);
        Ok(())
    }
}

impl Quantization for PerChannel {
    fn linear(
        &self,
        backend: &dyn Backend,
        name: &str,
        weight: Weight,
    ) -> anyhow::Result<Box<dyn Linear>> {
        whole_blocks(name, &weight, 32)?;
        let packed = PackedMatrix::quantize(&weight, Bits::Eight, false, |_, row, blocks| {
            let scale = row.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            for (block, values) in blocks.iter_mut().zip(row.chunks_exact(32)) {
                block.scale = scale;
                for (q, v) in block.quants.iter_mut().zip(values) {
                    *q = if scale > 0.0 {
                        (v / scale).round_ties_even() as i8
                    } else {
                        0
                    };
                }
            }
        });
        Ok(backend.linear(LinearWeight::Packed(packed)))
    }
}
