//! v2340 `int8`: weight-only int8, symmetric, one scale per output channel. Each row of every
//! projection is divided by `max |w| / 127` and rounded to nearest (ties to even) when the
//! model loads; decode multiplies the int8 weights by int8 activations (one scale per 32
//! activations) with the packed SIMD kernels, prefill widens them for the GEMM.

use vibee_core::config::ModelConfig;
use vibee_core::ops::{BuildContext, Factory, Linear, Quantization};
use vibee_core::quant::packed::{Bits, PackedLinear, PackedMatrix};
use vibee_core::weights::Weight;

use super::{full_precision, whole_blocks};

pub struct Int8;

vibee_core::operator_plugin!(Int8, "v2340", "int8", Quantization);

impl Factory<dyn Quantization> for Int8 {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        full_precision(config, "int8")
    }

    fn build(
        &self,
        _cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Quantization>> {
        Ok(Box::new(Int8))
    }
}

impl Quantization for Int8 {
    fn linear(&self, name: &str, weight: Weight) -> anyhow::Result<Box<dyn Linear>> {
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
        Ok(Box::new(PackedLinear(packed)))
    }
}
