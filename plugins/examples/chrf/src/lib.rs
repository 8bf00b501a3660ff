//! A third-party eval metric built only on vibee-sdk: chrF (Popović, 2015), the character
//! n-gram F-score, as sacreBLEU computes it by default: n-grams of 1 to 6 characters with
//! whitespace removed, precision and recall averaged over the orders both sides have, F with
//! β = 2, on a 0–100 scale. Configuration: none (empty).

use std::collections::HashMap;

use vibee_sdk::{EvalMetric, PanicPolicy};

const ORDER: usize = 6;
const BETA: f64 = 2.0;

struct Chrf;

fn ngrams(chars: &[char], n: usize) -> HashMap<&[char], usize> {
    let mut counts = HashMap::new();
    for gram in chars.windows(n) {
        *counts.entry(gram).or_insert(0) += 1;
    }
    counts
}

impl EvalMetric for Chrf {
    fn score(&mut self, prediction: &str, reference: &str) -> Result<f64, String> {
        let strip = |s: &str| -> Vec<char> { s.split_whitespace().flat_map(str::chars).collect() };
        let (hyp, reference) = (strip(prediction), strip(reference));
        let (mut precision, mut recall, mut orders) = (0.0, 0.0, 0);
        for n in 1..=ORDER {
            let (h, r) = (ngrams(&hyp, n), ngrams(&reference, n));
            let (n_hyp, n_ref): (usize, usize) = (h.values().sum(), r.values().sum());
            if n_hyp == 0 || n_ref == 0 {
                continue;
            }
            let matched: usize = h
                .iter()
                .map(|(gram, count)| (*count).min(*r.get(gram).unwrap_or(&0)))
                .sum();
            precision += matched as f64 / n_hyp as f64;
            recall += matched as f64 / n_ref as f64;
            orders += 1;
        }
        if orders == 0 {
            return Ok(0.0);
        }
        let (precision, recall) = (precision / orders as f64, recall / orders as f64);
        let factor = BETA * BETA;
        if precision + recall == 0.0 {
            return Ok(0.0);
        }
        Ok(100.0 * (1.0 + factor) * precision * recall / (factor * precision + recall))
    }
}

vibee_sdk::export_plugin! {
    name: "chrf",
    spec: "v2500",
    family: "language",
    summary: "chrF character n-gram F-score (sacreBLEU's default chrF)",
    on_panic: PanicPolicy::FailRequest,
    conformance: include_str!("../conformance.ron"),
    eval_metric: |config: &str| {
        if config.trim().is_empty() {
            Ok(Chrf)
        } else {
            Err(format!("chrf takes no configuration; got `{config}`"))
        }
    },
}
