//! How far a model's next-token distributions are from a reference model's on the same tokens:
//! the measure of quantization quality where perplexity means nothing (random weights).

use serde::Serialize;

use crate::backend::tensor::Matrix;

#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    pub positions: usize,
    /// Mean over positions of KL(reference ‖ model), in nats.
    pub mean_kl: f64,
    pub max_kl: f64,
    /// ‖model − reference‖ / ‖reference‖ over all logits.
    pub relative_error: f64,
    /// Positions whose most likely token is the same under both.
    pub top1_agreement: f64,
}

/// Compares two `[positions, vocab]` logit matrices.
pub fn divergence(reference: &Matrix, model: &Matrix) -> Divergence {
    assert_eq!((reference.rows, reference.cols), (model.rows, model.cols));
    let (mut total_kl, mut max_kl, mut agree) = (0.0f64, 0.0f64, 0usize);
    for (r, m) in reference.rows_iter().zip(model.rows_iter()) {
        let (log_p, log_q) = (log_softmax(r), log_softmax(m));
        let kl: f64 = log_p
            .iter()
            .zip(&log_q)
            .map(|(lp, lq)| lp.exp() * (lp - lq))
            .sum();
        total_kl += kl;
        max_kl = max_kl.max(kl);
        agree += usize::from(argmax(r) == argmax(m));
    }
    let squared = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
    let difference = squared(
        &mut reference
            .data
            .iter()
            .zip(&model.data)
            .map(|(r, m)| (*m - *r) as f64),
    );
    let positions = reference.rows;
    Divergence {
        positions,
        mean_kl: total_kl / positions as f64,
        max_kl,
        relative_error: difference / squared(&mut reference.data.iter().map(|r| *r as f64)),
        top1_agreement: agree as f64 / positions as f64,
    }
}

fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, l| m.max(*l as f64));
    let sum: f64 = logits.iter().map(|l| (*l as f64 - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|l| *l as f64 - log_sum).collect()
}

fn argmax(values: &[f32]) -> usize {
    (0..values.len())
        .max_by(|a, b| values[*a].total_cmp(&values[*b]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_known_distributions() {
        // p = (1/4, 3/4) against q = (3/4, 1/4): KL = ¼ ln ⅓ + ¾ ln 3 = ½ ln 3.
        let p = Matrix::from_vec(1, 2, vec![0.0, 3f32.ln()]);
        let q = Matrix::from_vec(1, 2, vec![5.0 + 3f32.ln(), 5.0]);
        let d = divergence(&p, &q);
        let expected = 0.5 * 3f64.ln();
        assert!((d.mean_kl - expected).abs() < 1e-7, "{}", d.mean_kl);
        assert_eq!(d.top1_agreement, 0.0);
        let same = divergence(&p, &p);
        assert!(same.mean_kl.abs() < 1e-12 && same.relative_error == 0.0);
        assert_eq!(same.top1_agreement, 1.0);
    }
}
