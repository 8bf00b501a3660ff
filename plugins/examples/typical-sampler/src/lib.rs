//! A third-party sampler built only on vibee-sdk: locally typical sampling (Meister et al.,
//! 2022), as transformers' `typical_p`: after the temperature, keep the tokens whose
//! information content is closest to the distribution's entropy until they cover `mass`
//! probability, and draw among them. Configuration: `mass`, in (0, 1) (e.g. `0.9`).

use vibee_sdk::{PanicPolicy, Sampler, SamplingSettings, Sequence};

struct Typical {
    mass: f64,
}

impl Typical {
    fn new(config: &str) -> Result<Self, String> {
        match config.trim().parse::<f64>() {
            Ok(mass) if mass > 0.0 && mass < 1.0 => Ok(Self { mass }),
            _ => Err(format!(
                "typical-sampler's configuration is the typical mass, in (0, 1); got `{config}`"
            )),
        }
    }
}

impl Sampler for Typical {
    fn sample(
        &mut self,
        seq: Sequence<'_>,
        logits: &[f32],
        settings: &SamplingSettings,
    ) -> Result<u32, String> {
        if logits.is_empty() {
            return Err("no logits to sample from".into());
        }
        let argmax =
            (0..logits.len()).fold(0, |best, i| if logits[i] > logits[best] { i } else { best });
        if settings.temperature <= 0.0 {
            return Ok(argmax as u32);
        }
        let scaled: Vec<f64> = logits
            .iter()
            .map(|&l| l as f64 / settings.temperature as f64)
            .collect();
        let top = scaled[argmax];
        let total: f64 = scaled.iter().map(|l| (l - top).exp()).sum();
        let log_probs: Vec<f64> = scaled.iter().map(|l| l - top - total.ln()).collect();
        let entropy: f64 = log_probs
            .iter()
            .filter(|lp| lp.is_finite())
            .map(|lp| -lp.exp() * lp)
            .sum();
        // Tokens by how far their surprise is from the entropy, nearest first.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        let distance = |i: usize| (-log_probs[i] - entropy).abs();
        order.sort_by(|&a, &b| distance(a).total_cmp(&distance(b)).then(a.cmp(&b)));
        let mut covered = 0.0;
        let mut last = 0;
        for (rank, &token) in order.iter().enumerate() {
            covered += log_probs[token].exp();
            last = rank;
            if covered >= self.mass {
                break;
            }
        }
        // Ties at the boundary stay in, as with transformers' comparison of sorted scores.
        let cutoff = distance(order[last]);
        let kept: Vec<usize> = order
            .into_iter()
            .filter(|&t| distance(t) <= cutoff)
            .collect();
        let weights: Vec<f64> = kept.iter().map(|&t| log_probs[t].exp()).collect();
        let step = seq.generated.len() as u64;
        let mut draw = uniform(settings.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            * weights.iter().sum::<f64>();
        for (token, weight) in kept.iter().zip(&weights) {
            if draw < *weight {
                return Ok(*token as u32);
            }
            draw -= weight;
        }
        Ok(*kept.last().expect("the nearest token is always kept") as u32)
    }
}

/// A uniform draw in [0, 1) from a 64-bit seed (SplitMix64).
fn uniform(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

vibee_sdk::export_plugin! {
    name: "typical-sampler",
    spec: "v2382",
    family: "serving",
    summary: "Locally typical sampling (transformers' typical_p), in place of the built-in sampler",
    on_panic: PanicPolicy::FailRequest,
    conformance: include_str!("../conformance.ron"),
    sampler: Typical::new,
}
