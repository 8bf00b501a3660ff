//! v2345 `gguf`: llama.cpp's block-quantized tensor types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
//! K-quants Q2_K–Q6_K) from a GGUF file. Matrix-vector products quantize the activations to
//! int8 per 32-element block and take integer dot products with the weight blocks; long
//! prompts widen blocks of rows for a GEMM.

use vibee_core::backend::quant::packed::PackedMatrix;
use vibee_core::backend::{Backend, LinearWeight};
use vibee_core::config::ModelConfig;
use vibee_core::io::weights::Weight;
use vibee_core::model::ops::{BuildContext, Factory, Linear, Quantization};

pub struct Gguf;

vibee_core::operator_plugin!(Gguf, "v2345", "gguf", Quantization);

impl Factory<dyn Quantization> for Gguf {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match config.quantization {
            Some("gguf") => Ok(()),
            _ => Err(
                "the checkpoint holds no GGUF-quantized tensors (load a quantized .gguf file)"
                    .into(),
            ),
        }
    }

    fn build(
        &self,
        _cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Quantization>> {
        Ok(Box::new(Gguf))
    }
}

impl Quantization for Gguf {
    /// Quantized matrices are repacked, weight for weight, for the SIMD integer kernels (a
    /// copy: the file's interleaved scales would cost the kernels a load per block); f32/f16
    /// matrices of a mixed file run in place through the float kernels.
    fn linear(
        &self,
        backend: &dyn Backend,
        _name: &str,
        weight: Weight,
    ) -> anyhow::Result<Box<dyn Linear>> {
        Ok(match PackedMatrix::from_gguf(&weight) {
            Some(packed) => backend.linear(LinearWeight::Packed(packed)),
            None => backend.linear(LinearWeight::Dense(weight)),
        })
    }

    /// Quantized matrices of one layout stack into one packed product.
    fn stacked_linear(
        &self,
        backend: &dyn Backend,
        weights: Vec<Weight>,
    ) -> anyhow::Result<Option<Box<dyn Linear>>> {
        let packed: Option<Vec<PackedMatrix>> =
            weights.iter().map(PackedMatrix::from_gguf).collect();
        Ok(packed
            .and_then(PackedMatrix::stack)
            .map(|stacked| backend.linear(LinearWeight::Packed(stacked))))
    }
}
