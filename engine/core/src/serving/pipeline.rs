//! The serving pipeline's state and the engine's own systems.
//!
//! A request is an entity. Admit gives it a KV cache, Forward runs the model over the tokens
//! it has not yet cached and leaves next-token `Logits`, the sampler plugin (Sample) picks a
//! `NextToken`, and Emit appends it, streams it and checks stop conditions.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bevy_ecs::prelude::*;

use crate::app::{App, Stage};
use crate::config::ModelConfig;
use crate::model::ops::SequenceKv;
use crate::model::Model;
use crate::serving::text::TextStream;

#[derive(Resource, Clone)]
pub struct ModelResource(pub Arc<Model>);

#[derive(Component, Debug, Clone, Default)]
pub struct Tokens {
    pub prompt: Vec<u32>,
    pub generated: Vec<u32>,
}

impl Tokens {
    pub fn len(&self) -> usize {
        self.prompt.len() + self.generated.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token `i` of prompt followed by generated text.
    pub fn get(&self, i: usize) -> u32 {
        if i < self.prompt.len() {
            self.prompt[i]
        } else {
            self.generated[i - self.prompt.len()]
        }
    }
}

/// How the next token is chosen, in the order Hugging Face applies these: repetition penalty,
/// temperature, top-k, top-p, min-p, then a draw (or argmax when `temperature` is 0).
#[derive(Component, Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables.
    pub repetition_penalty: f32,
    pub seed: u64,
    pub max_tokens: usize,
    /// Keep generating past end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Under the priority policy, requests with lower values are scheduled first and
    /// preempted last (vLLM's `priority`).
    pub priority: i64,
    /// Only requests with the same salt share prefix-cache blocks (vLLM's `cache_salt`),
    /// so that one tenant cannot learn from timing what another's prompts began with.
    pub cache_salt: Option<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            max_tokens: 64,
            ignore_eos: false,
            priority: 0,
            cache_salt: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// An end-of-sequence token.
    Stop,
    /// The model's context is full.
    Context,
    /// A text filter ended the request.
    ContentFilter,
}

#[derive(Component, Debug, Clone, PartialEq)]
pub enum SeqState {
    Waiting,
    Running,
    Finished(FinishReason),
    Failed(String),
}

#[derive(Component)]
pub struct Kv(pub Box<dyn SequenceKv>);

/// Next-token logits left by Forward for the sampler.
#[derive(Component, Debug, Default)]
pub struct Logits(pub Vec<f32>);

#[derive(Component, Debug, Default)]
pub struct NextToken(pub Option<u32>);

/// What Emit streams for each new token: the token and the text it adds once text filters
/// had it (empty while a character or a pattern is incomplete, and without a tokenizer).
#[derive(Debug, Clone, PartialEq)]
pub struct Streamed {
    pub token: u32,
    pub text: String,
}

/// Where Emit streams each new token.
#[derive(Component)]
pub struct StreamTx(pub Sender<Streamed>);

#[derive(Component, Debug, Clone)]
pub struct Timing {
    pub submitted: Instant,
    pub prefill: Duration,
    pub decode: Duration,
    pub decode_steps: usize,
    pub first_token: Option<Duration>,
}

impl Timing {
    pub fn new() -> Self {
        Self {
            submitted: Instant::now(),
            prefill: Duration::ZERO,
            decode: Duration::ZERO,
            decode_steps: 0,
            first_token: None,
        }
    }
}

impl Default for Timing {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Resource, Debug, Default, Clone)]
pub struct Metrics {
    pub steps: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub finished: u64,
    pub failed: u64,
    /// Requests that gave their KV blocks back to wait for room (recomputed when readmitted).
    pub preempted: u64,
    /// The most tokens one step's forward has run.
    pub largest_step_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache instead of a forward.
    pub prefix_hit_tokens: u64,
}

/// Everything a new request entity carries.
pub fn request_bundle(prompt: Vec<u32>, params: SamplingParams) -> impl Bundle {
    (
        Tokens {
            prompt,
            generated: Vec::new(),
        },
        params,
        SeqState::Waiting,
        Logits::default(),
        NextToken::default(),
        Timing::new(),
        TextStream::default(),
    )
}

/// Installs the engine's own serving systems (not a plugin: there is no pipeline without
/// them). Admission and the forward of each step are the scheduler plugin's.
pub fn install(app: &mut App, model: Arc<Model>) {
    app.world.insert_resource(ModelResource(model));
    app.world.init_resource::<Metrics>();
    app.world.init_resource::<StepBudget>();
    app.add_systems(Stage::Emit, emit);
    app.add_systems(Stage::Monitor, monitor);
}

/// Put in the world by the plugin that fills the `scheduler` slot (it admits requests and
/// runs each step's forward): a pipeline without one would never run a request.
#[derive(Resource, Debug, Clone, Copy)]
pub struct Scheduler;

/// The order in which a step serves running requests (and preempts the last of them): the
/// scheduling-policy plugin's choice. Smaller keys go first.
#[derive(Resource, Clone, Copy)]
pub struct Ranking(pub fn(&SamplingParams, &Timing) -> (i64, Instant));

/// How much one step may run, named as vLLM names them: tokens over all requests (a long
/// prompt is prefilled in chunks across steps, with the `chunked-prefill` plugin) and
/// requests.
#[derive(Resource, Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepBudget {
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
}

impl Default for StepBudget {
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 2048,
            max_num_seqs: 256,
        }
    }
}

/// Why appending `token` ends the request, if it does.
pub fn stop_reason(
    tokens: &Tokens,
    token: u32,
    params: &SamplingParams,
    config: &ModelConfig,
) -> Option<FinishReason> {
    if !params.ignore_eos && config.eos_token_ids.contains(&token) {
        Some(FinishReason::Stop)
    } else if tokens.generated.len() + 1 >= params.max_tokens {
        Some(FinishReason::Length)
    } else if tokens.len() + 1 >= config.context_length() {
        Some(FinishReason::Context)
    } else {
        None
    }
}

/// What Emit touches on each running request.
type EmitItems<'a> = (
    &'a mut Tokens,
    &'a Logits,
    &'a mut NextToken,
    &'a SamplingParams,
    &'a mut SeqState,
    &'a mut Timing,
    &'a mut TextStream,
    Option<&'a StreamTx>,
);

fn emit(model: Res<ModelResource>, mut running: Query<EmitItems>) {
    let config = &model.0.config;
    for (mut tokens, logits, mut next, params, mut state, mut timing, mut text, stream) in
        &mut running
    {
        if *state != SeqState::Running {
            continue;
        }
        let Some(token) = next.0.take() else {
            if logits.0.is_empty() {
                // Not run this step, or in the middle of its prompt: no token is due.
                continue;
            }
            *state = SeqState::Failed(
                "no sampler chose a next token (is a `sampler` plugin enabled?)".into(),
            );
            continue;
        };
        let finish = match text.stop {
            Some(_) => Some(FinishReason::ContentFilter),
            None => stop_reason(&tokens, token, params, config),
        };
        tokens.generated.push(token);
        if timing.first_token.is_none() {
            timing.first_token = Some(timing.submitted.elapsed());
        }
        let delta = std::mem::take(&mut text.delta);
        text.released.push_str(&delta);
        if let Some(StreamTx(tx)) = stream {
            // A receiver that hung up only means nobody listens any more; generation state
            // stays consistent and the request finishes normally.
            let _ = tx.send(Streamed { token, text: delta });
        }
        if let Some(reason) = finish {
            *state = SeqState::Finished(reason);
        }
    }
}

/// Counts what changed this step, and takes the KV cache of every request that ended, so its
/// blocks go back to the pool at once however long the entity is kept (a server streams the
/// last chunk, a client reads the result).
fn monitor(
    mut commands: Commands,
    mut metrics: ResMut<Metrics>,
    arrived: Query<&Tokens, Added<SeqState>>,
    changed: Query<(Entity, &Tokens, &SeqState), Changed<SeqState>>,
) {
    metrics.steps += 1;
    // Counted once per request, not again when a preempted one is readmitted.
    for tokens in &arrived {
        metrics.prompt_tokens += tokens.prompt.len() as u64;
    }
    for (entity, tokens, state) in &changed {
        match state {
            SeqState::Finished(_) => {
                metrics.finished += 1;
                metrics.generated_tokens += tokens.generated.len() as u64;
            }
            SeqState::Failed(_) => metrics.failed += 1,
            SeqState::Running | SeqState::Waiting => continue,
        }
        commands.entity(entity).remove::<Kv>();
    }
}
