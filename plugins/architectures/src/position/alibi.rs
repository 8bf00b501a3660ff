//! v2221 `alibi`: attention with linear biases (BLOOM, MPT). No embedding is added to queries or
//! keys; each head's scores gain `slope · key_position`, which, under softmax, is a penalty
//! growing linearly with distance. Slopes follow the paper: a geometric sequence for the largest
//! power of two not above the head count, interleaved extras for the remaining heads.

use vibee_core::config::{ModelConfig, PositionKind};
use vibee_core::model::ops::{BuildContext, Factory, PositionEncoding};
use vibee_core::Matrix;

pub struct Alibi;

vibee_core::operator_plugin!(Alibi, "v2221", "alibi", Position);

impl Factory<dyn PositionEncoding> for Alibi {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match config.position {
            PositionKind::Alibi => Ok(()),
            other => Err(super::mismatch(config, other)),
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn PositionEncoding>> {
        Ok(Box::new(AlibiSlopes(slopes(cx.config.num_heads))))
    }
}

/// The slopes of `heads` heads, computed in f32 as transformers does.
pub fn slopes(heads: usize) -> Vec<f32> {
    let power = 1usize << heads.ilog2();
    let base = |n: usize| 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0)))) as f32;
    let mut slopes: Vec<f32> = (1..=power as i32).map(|p| base(power).powi(p)).collect();
    let extra = (heads - power).min(power);
    slopes.extend((0..extra as i32).map(|i| base(2 * power).powi(2 * i + 1)));
    slopes
}

struct AlibiSlopes(Vec<f32>);

impl PositionEncoding for AlibiSlopes {
    fn apply(&self, _x: &mut Matrix, _heads: usize, _positions: &[usize]) {}

    fn alibi_slopes(&self) -> Option<&[f32]> {
        Some(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::slopes;

    #[test]
    fn slopes_match_the_paper() {
        // 8 heads: 1/2, 1/4, …, 1/256; 6 heads: the 4-head sequence then 2^-1, 2^-3 of base 2^-1.
        assert_eq!(
            slopes(8),
            (1..=8).map(|i| 0.5f32.powi(i)).collect::<Vec<_>>()
        );
        assert_eq!(
            slopes(6),
            vec![
                0.25,
                0.0625,
                0.015625,
                0.00390625,
                0.5f32.powi(1),
                0.5f32.powi(3)
            ]
        );
    }
}
