//! Streaming text: each request's generated tokens decoded incrementally in the Filter stage,
//! where text filters see it before Emit streams it to the client.

use std::sync::Arc;

use bevy_ecs::prelude::*;

use crate::app::{App, Order, Stage};
use crate::io::tokenizer::Tokenizer;
use crate::serving::pipeline::{
    stop_reason, ModelResource, NextToken, SamplingParams, SeqState, Tokens,
};

#[derive(Resource, Clone)]
pub struct TokenizerResource(pub Arc<Tokenizer>);

/// A request's text as it streams.
#[derive(Component, Debug, Default)]
pub struct TextStream {
    /// Generated tokens before `prefix` are never decoded again; those in `prefix..read` are
    /// the context that makes the next token decode as it would in the whole text (a
    /// SentencePiece space, a byte-level character split over tokens).
    prefix: usize,
    read: usize,
    /// Text this step's token adds: set by the detokenizer, rewritten by each text filter,
    /// streamed and appended to `released` by Emit.
    pub delta: String,
    /// This step's token ends the request: the filters' last chance to release held text.
    pub finishing: bool,
    /// A filter ended the request, and why.
    pub stop: Option<String>,
    /// Everything streamed so far.
    pub released: String,
    /// Why filters flagged the request.
    pub flags: Vec<String>,
}

pub fn install(app: &mut App, tokenizer: Arc<Tokenizer>) {
    app.world.insert_resource(TokenizerResource(tokenizer));
    app.add_systems_at(Stage::Filter, Order::Early, detokenize);
}

fn detokenize(
    tokenizer: Res<TokenizerResource>,
    model: Res<ModelResource>,
    mut running: Query<(
        &Tokens,
        &NextToken,
        &SamplingParams,
        &SeqState,
        &mut TextStream,
    )>,
) {
    for (tokens, next, params, state, mut text) in &mut running {
        let (SeqState::Running, Some(token)) = (state, next.0) else {
            continue;
        };
        text.finishing = stop_reason(tokens, token, params, &model.0.config).is_some();
        let window: Vec<u32> = tokens.generated[text.prefix..]
            .iter()
            .copied()
            .chain([token])
            .collect();
        let context = text.read - text.prefix;
        let (Ok(before), Ok(after)) = (
            tokenizer.0.decode(&window[..context]),
            tokenizer.0.decode(&window),
        ) else {
            continue;
        };
        // A token can end inside a multi-byte character, and a run of byte-fallback tokens
        // decodes as a whole: wait for the rest, unless nothing more will come.
        let complete =
            !(after.ends_with('\u{FFFD}') || tokenizer.0.is_byte(token)) || text.finishing;
        match after.get(before.len()..) {
            Some(delta) if complete && after.len() > before.len() => {
                text.delta = delta.to_string();
                text.prefix = text.read;
                text.read = tokens.generated.len() + 1;
            }
            _ => text.delta.clear(),
        }
    }
}
