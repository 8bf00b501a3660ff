//! v2220 `rope`: rotary position embeddings in the half-split layout Hugging Face Llama uses,
//! or in adjacent pairs (DeepSeek), with `rope_theta`, the `linear`, `dynamic` (NTK), `llama3`,
//! `yarn` and `longrope` scalings, and partial
//! rotation of each head's leading dimensions (GPT-NeoX's `partial_rotary_factor`).
//!
//! Frequencies and angles are computed in f32, as transformers does, so positions far into the
//! context round the same way.

use std::f64::consts::PI;

use std::sync::Arc;

use vibee_core::backend::{Backend, Rotary};
use vibee_core::config::{ModelConfig, PositionKind, RopeScaling};
use vibee_core::model::ops::{BuildContext, Factory, PositionEncoding};
use vibee_core::Matrix;

pub struct Rope;

vibee_core::operator_plugin!(Rope, "v2220", "rope", Position);

impl Factory<dyn PositionEncoding> for Rope {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        if config.position != PositionKind::Rope {
            return Err(super::mismatch(config, config.position));
        }
        if let RopeScaling::LongRope { short, long, .. } = &config.rope_scaling {
            let want = config.rotary_dim / 2;
            if short.len() != want || long.len() != want {
                return Err(format!(
                    "config.json longrope short_factor/long_factor have {}/{} entries, need {want} (rotary dim / 2)",
                    short.len(),
                    long.len()
                ));
            }
        }
        if config.rope_theta > 0.0 {
            Ok(())
        } else {
            Err(format!(
                "config.json rope_theta = {} must be positive",
                config.rope_theta
            ))
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn PositionEncoding>> {
        let config = cx.config;
        let dim = config.rotary_dim;
        let inv_freq = scaled_inv_freq(
            base_inv_freq(config.rope_theta as f32, dim),
            config.rope_theta,
            &config.rope_scaling,
        );
        Ok(Box::new(RotaryEmbedding {
            dim,
            head_dim: config.head_dim,
            interleaved: config.rope_interleaved,
            inv_freq,
            theta: config.rope_theta as f32,
            scaling: config.rope_scaling.clone(),
            max_position_embeddings: config.max_position_embeddings,
            backend: cx.backend.clone(),
        }))
    }
}

/// `1 / base^(2i/dim)` for i in 0..dim/2.
fn base_inv_freq(base: f32, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
        .collect()
}

fn scaled_inv_freq(inv_freq: Vec<f32>, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
    match *scaling {
        RopeScaling::None | RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. } => inv_freq,
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            truncate,
            ..
        } => yarn(
            &inv_freq,
            theta,
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            truncate,
        ),
        RopeScaling::Linear { factor } => inv_freq.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old_context = original_max_position_embeddings as f64;
            let low_freq_wavelen = old_context / low_freq_factor;
            let high_freq_wavelen = old_context / high_freq_factor;
            inv_freq
                .iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * PI / f;
                    let scaled = if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        f
                    };
                    let medium = (high_freq_wavelen..=low_freq_wavelen).contains(&wavelen);
                    if medium {
                        let smooth = (old_context / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                    } else {
                        scaled as f32
                    }
                })
                .collect()
        }
    }
}

/// YaRN: each frequency is a blend of the original (extrapolated) and the `factor`-divided
/// (interpolated) one, by a linear ramp between the dimensions whose wavelengths make
/// `beta_fast` and `beta_slow` rotations over the trained context.
fn yarn(
    inv_freq: &[f32],
    base: f64,
    factor: f64,
    original: usize,
    beta_fast: f64,
    beta_slow: f64,
    truncate: bool,
) -> Vec<f32> {
    let dim = (inv_freq.len() * 2) as f64;
    let correction_dim =
        |rotations: f64| dim * (original as f64 / (rotations * 2.0 * PI)).ln() / (2.0 * base.ln());
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, high) = (low.max(0.0) as f32, high.min(dim - 1.0) as f32);
    let high = if low == high { high + 0.001 } else { high };
    inv_freq
        .iter()
        .enumerate()
        .map(|(i, &extrapolated)| {
            let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation = 1.0 - ramp;
            let interpolated = extrapolated / factor as f32;
            interpolated * (1.0 - extrapolation) + extrapolated * extrapolation
        })
        .collect()
}

struct RotaryEmbedding {
    /// Rotated leading dimensions of each head (all of it unless partial, as in GPT-NeoX).
    dim: usize,
    head_dim: usize,
    /// Adjacent pairs rotate together (DeepSeek) instead of the two halves.
    interleaved: bool,
    inv_freq: Vec<f32>,
    theta: f32,
    scaling: RopeScaling,
    max_position_embeddings: usize,
    backend: Arc<dyn Backend>,
}

impl RotaryEmbedding {
    /// The frequencies for this forward pass, and the factor on cos/sin. Dynamic NTK scaling
    /// raises the base once the sequence outgrows the trained context, and longrope switches
    /// from its short to its long factors there, judged by the furthest position in this
    /// forward pass (as transformers does).
    fn frequencies(&self, positions: &[usize]) -> (Vec<f32>, f32) {
        let seq_len = positions.iter().max().map_or(0, |p| p + 1);
        match &self.scaling {
            RopeScaling::Dynamic { factor, .. } if seq_len > self.max_position_embeddings => {
                let (factor, dim) = (*factor as f32, self.dim as f32);
                let growth =
                    factor * seq_len as f32 / self.max_position_embeddings as f32 - (factor - 1.0);
                (
                    base_inv_freq(self.theta * growth.powf(dim / (dim - 2.0)), self.dim),
                    1.0,
                )
            }
            RopeScaling::LongRope {
                short,
                long,
                original_max_position_embeddings,
                attention_factor,
            } => {
                let factors = if seq_len > *original_max_position_embeddings {
                    long
                } else {
                    short
                };
                let dim = self.dim as f32;
                let inv_freq = factors
                    .iter()
                    .enumerate()
                    .map(|(i, &e)| 1.0 / (e as f32 * self.theta.powf((2 * i) as f32 / dim)))
                    .collect();
                (inv_freq, *attention_factor as f32)
            }
            RopeScaling::Yarn {
                attention_factor, ..
            } => (self.inv_freq.clone(), *attention_factor as f32),
            _ => (self.inv_freq.clone(), 1.0),
        }
    }
}

impl PositionEncoding for RotaryEmbedding {
    fn apply(&self, x: &mut Matrix, heads: usize, positions: &[usize]) {
        let (inv_freq, magnitude) = self.frequencies(positions);
        let rotary = Rotary {
            heads,
            head_dim: self.head_dim,
            inv_freq: &inv_freq,
            magnitude,
            interleaved: self.interleaved,
        };
        self.backend.rotary(x, &rotary, positions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_keeps_high_frequencies_and_divides_low_ones() {
        let base = base_inv_freq(500000.0, 64);
        let scaled = scaled_inv_freq(
            base.clone(),
            500000.0,
            &RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        );
        assert_eq!(scaled[0], base[0]);
        let last = base.len() - 1;
        assert!((scaled[last] - base[last] / 8.0).abs() <= f32::EPSILON * base[last]);
    }
}
