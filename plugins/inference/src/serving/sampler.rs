//! v2380 `sampler`: chooses the next token from the logits Forward left, applying, in Hugging
//! Face's order, repetition penalty, temperature, top-k, top-p and min-p, then drawing with a
//! seeded generator (or taking the argmax when the temperature is 0).

use bevy_ecs::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use vibee_core::app::Stage;
use vibee_core::backend::math::softmax;
use vibee_core::serving::pipeline::{Logits, NextToken, SamplingParams, SeqState, Tokens};
use vibee_core::{App, Plugin, PluginSpec};

pub struct Sampler;

impl Plugin for Sampler {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2380",
            name: "sampler",
        }
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        app.add_systems(Stage::Sample, sample);
        Ok(())
    }
}

fn sample(
    mut running: Query<(
        &Tokens,
        &SamplingParams,
        &mut Logits,
        &mut NextToken,
        &SeqState,
    )>,
) {
    for (tokens, params, mut logits, mut next, state) in &mut running {
        if *state == SeqState::Running && !logits.0.is_empty() {
            next.0 = Some(choose(&mut logits.0, tokens, params));
        }
    }
}

/// Picks a token; `logits` is used as scratch.
pub fn choose(logits: &mut [f32], tokens: &Tokens, params: &SamplingParams) -> u32 {
    if params.repetition_penalty != 1.0 {
        penalize_repeats(logits, tokens, params.repetition_penalty);
    }
    if params.temperature <= 0.0 {
        return argmax(logits);
    }
    for l in logits.iter_mut() {
        *l /= params.temperature;
    }
    // Candidates sorted by descending logit; ties keep the lower token id first.
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    if params.top_k > 0 {
        order.truncate(params.top_k);
    }
    let mut probs: Vec<f32> = order.iter().map(|&t| logits[t as usize]).collect();
    softmax(&mut probs);
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cumulative += p;
                cumulative >= params.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        order.truncate(keep);
        probs.truncate(keep);
    }
    if params.min_p > 0.0 {
        let threshold = params.min_p * probs[0];
        let keep = probs.iter().take_while(|p| **p >= threshold).count().max(1);
        order.truncate(keep);
        probs.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    let step = tokens.generated.len() as u64;
    let mut rng = StdRng::seed_from_u64(params.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut draw = rng.random::<f32>() * total;
    for (token, p) in order.iter().zip(&probs) {
        if draw < *p {
            return *token;
        }
        draw -= p;
    }
    *order
        .last()
        .expect("at least one candidate survives filtering")
}

/// CTRL-style penalty, as transformers applies it: seen tokens' positive logits are divided by
/// the penalty, negative ones multiplied.
fn penalize_repeats(logits: &mut [f32], tokens: &Tokens, penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for t in tokens.prompt.iter().chain(&tokens.generated) {
        let t = *t as usize;
        if t < logits.len() && !std::mem::replace(&mut seen[t], true) {
            let l = &mut logits[t];
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// The first index of the largest logit, as `torch.argmax` picks.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..SamplingParams::default()
        }
    }

    fn tokens(prompt: &[u32]) -> Tokens {
        Tokens {
            prompt: prompt.to_vec(),
            generated: vec![],
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(
            choose(&mut [0.1, 2.0, 2.0, -1.0], &tokens(&[]), &params(0.0)),
            1
        );
    }

    #[test]
    fn repetition_penalty_can_change_the_greedy_choice() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        };
        assert_eq!(choose(&mut [3.0, 2.0, -1.0], &tokens(&[0]), &p), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_reproduce() {
        let logits = [0.5, 1.5, 1.4, 0.0];
        let p = SamplingParams {
            top_k: 1,
            ..params(1.0)
        };
        assert_eq!(choose(&mut logits.clone(), &tokens(&[]), &p), 1);
        let p = SamplingParams {
            seed: 7,
            ..params(1.0)
        };
        let draws: Vec<u32> = (0..2)
            .map(|_| choose(&mut logits.clone(), &tokens(&[]), &p))
            .collect();
        assert_eq!(draws[0], draws[1]);
    }

    #[test]
    fn top_p_and_min_p_exclude_unlikely_tokens() {
        // Probabilities ≈ [0.64, 0.24, 0.09, 0.03].
        let logits = [3.0, 2.0, 1.0, 0.0];
        let p = SamplingParams {
            top_p: 0.6,
            ..params(1.0)
        };
        let p_min = SamplingParams {
            min_p: 0.5,
            ..params(1.0)
        };
        for seed in 0..50 {
            assert_eq!(
                choose(
                    &mut logits.clone(),
                    &tokens(&[]),
                    &SamplingParams { seed, ..p.clone() }
                ),
                0
            );
            assert_eq!(
                choose(
                    &mut logits.clone(),
                    &tokens(&[]),
                    &SamplingParams {
                        seed,
                        ..p_min.clone()
                    }
                ),
                0
            );
        }
    }
}
