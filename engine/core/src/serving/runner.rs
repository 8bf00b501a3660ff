//! Runs one generation request through the serving pipeline to completion.

use std::time::Duration;

use anyhow::bail;
use bevy_ecs::entity::Entity;
use serde::Serialize;

use crate::app::App;
use crate::serving::pipeline::{
    request_bundle, FinishReason, ModelResource, SamplingParams, SeqState, StreamTx, Streamed,
    Timing, Tokens,
};
use crate::serving::text::{TextStream, TokenizerResource};

#[derive(Debug, Clone, Serialize)]
pub struct GenerateOutput {
    pub tokens: Vec<u32>,
    /// The streamed text, after text filters (absent without a tokenizer).
    pub text: Option<String>,
    /// Why text filters flagged the request.
    pub flags: Vec<String>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub time_to_first_token_s: f64,
}

/// Rejects requests the pipeline cannot run, before they use any resources.
pub fn validate(app: &App, prompt: &[u32], params: &SamplingParams) -> anyhow::Result<()> {
    let config = &app.world.resource::<ModelResource>().0.config;
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one token");
    }
    if params.max_tokens == 0 {
        bail!("max tokens must be at least 1");
    }
    if prompt.len() >= config.context_length() {
        bail!(
            "the prompt has {} tokens but the model's context holds {}, leaving no room to generate",
            prompt.len(),
            config.context_length()
        );
    }
    if let Some(bad) = prompt.iter().find(|t| **t as usize >= config.vocab_size) {
        bail!(
            "prompt token id {bad} is outside the vocabulary (size {})",
            config.vocab_size
        );
    }
    Ok(())
}

pub fn generate(
    app: &mut App,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> anyhow::Result<GenerateOutput> {
    generate_streaming(app, prompt, params, |_| {})
}

/// Like [`generate`], calling `on_token` with each token and its text as soon as a step
/// emits it.
pub fn generate_streaming(
    app: &mut App,
    prompt: Vec<u32>,
    params: SamplingParams,
    mut on_token: impl FnMut(&Streamed),
) -> anyhow::Result<GenerateOutput> {
    validate(app, &prompt, &params)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let entity = app
        .world
        .spawn((request_bundle(prompt, params), StreamTx(tx)))
        .id();
    let finish = loop {
        app.step();
        rx.try_iter().for_each(|streamed| on_token(&streamed));
        match app.world.get::<SeqState>(entity) {
            Some(SeqState::Finished(reason)) => break *reason,
            Some(SeqState::Failed(why)) => {
                let why = why.clone();
                app.world.despawn(entity);
                bail!("generation failed: {why}");
            }
            _ => {}
        }
    };
    Ok(collect(app, entity, finish))
}

/// Runs every prompt through the pipeline at once (they share each step's batched forward)
/// until all are done; each result is its request's own output, or why it failed.
pub fn generate_many(
    app: &mut App,
    requests: Vec<(Vec<u32>, SamplingParams)>,
) -> Vec<anyhow::Result<GenerateOutput>> {
    let mut pending: Vec<anyhow::Result<Entity>> = requests
        .into_iter()
        .map(|(prompt, params)| {
            validate(app, &prompt, &params)?;
            Ok(app.world.spawn(request_bundle(prompt, params)).id())
        })
        .collect();
    let mut results: Vec<Option<anyhow::Result<GenerateOutput>>> =
        pending.iter().map(|_| None).collect();
    loop {
        for (slot, entity) in results.iter_mut().zip(&mut pending) {
            if slot.is_some() {
                continue;
            }
            let id = match entity {
                Ok(id) => *id,
                Err(e) => {
                    *slot = Some(Err(anyhow::anyhow!("{e:#}")));
                    continue;
                }
            };
            match app.world.get::<SeqState>(id) {
                Some(SeqState::Finished(reason)) => {
                    let reason = *reason;
                    *slot = Some(Ok(collect(app, id, reason)));
                }
                Some(SeqState::Failed(why)) => {
                    *slot = Some(Err(anyhow::anyhow!("generation failed: {why}")));
                    app.world.despawn(id);
                }
                _ => {}
            }
        }
        if results.iter().all(Option::is_some) {
            return results.into_iter().map(|r| r.expect("all done")).collect();
        }
        app.step();
    }
}

/// A finished request's output; the request leaves the world.
fn collect(app: &mut App, entity: Entity, finish: FinishReason) -> GenerateOutput {
    let tokens = app.world.get::<Tokens>(entity).cloned().unwrap_or_default();
    let timing = app.world.get::<Timing>(entity).cloned().unwrap_or_default();
    let text = app
        .world
        .entity_mut(entity)
        .take::<TextStream>()
        .unwrap_or_default();
    let has_tokenizer = app.world.contains_resource::<TokenizerResource>();
    app.world.despawn(entity);
    let rate = |n: usize, d: Duration| {
        if d.is_zero() {
            0.0
        } else {
            n as f64 / d.as_secs_f64()
        }
    };
    GenerateOutput {
        prompt_tokens: tokens.prompt.len(),
        prefill_tokens_per_s: rate(tokens.prompt.len(), timing.prefill),
        decode_tokens_per_s: rate(timing.decode_steps, timing.decode),
        time_to_first_token_s: timing.first_token.unwrap_or_default().as_secs_f64(),
        tokens: tokens.generated,
        text: has_tokenizer.then_some(text.released),
        flags: text.flags,
        finish_reason: finish,
    }
}
