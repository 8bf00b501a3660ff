//! v2320 `continuous-batching`: iteration-level scheduling. Every step admits the requests
//! that arrived (each gets a sequence in the KV pool), then runs one batched forward over the
//! running requests' uncached tokens within the step's budget (`--max-num-batched-tokens`,
//! `--max-num-seqs`): decode tokens first, then prompts, each group in the scheduling
//! policy's order. A request that finishes leaves at the step's end and gives its blocks back;
//! a waiting one joins at the next. `chunked-prefill` lets a prompt take what is left of a
//! budget, `preemption` makes room when the pool runs short.

use bevy_ecs::prelude::*;
use vibee_core::app::Stage;
use vibee_core::model::{BatchEntry, Model, Wanted};
use vibee_core::serving::external::Deferred;
use vibee_core::serving::pipeline::{
    Kv, Logits, Metrics, ModelResource, Ranking, SamplingParams, Scheduler, SeqState, StepBudget,
    Timing, Tokens,
};
use vibee_core::{App, Plugin, PluginSpec};

use super::chunked_prefill::PrefillInChunks;
use super::preemption::PreemptByRecompute;

pub struct ContinuousBatching;

impl Plugin for ContinuousBatching {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2320",
            name: "continuous-batching",
        }
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        app.world.insert_resource(Scheduler);
        app.add_systems(Stage::Admit, admit);
        app.add_systems(Stage::Forward, forward);
        Ok(())
    }
}

/// Every waiting request gets a fresh sequence, unless an admission-policy plugin deferred it
/// this step.
fn admit(
    mut commands: Commands,
    model: Res<ModelResource>,
    mut waiting: Query<(Entity, &mut SeqState), Without<Deferred>>,
) {
    for (entity, mut state) in &mut waiting {
        if *state == SeqState::Waiting {
            commands.entity(entity).insert(Kv(model.0.new_sequence()));
            *state = SeqState::Running;
        }
    }
}

/// One running request's share of a step's forward.
struct Feed<'w> {
    /// This step's tokens: all the request has not cached, or a chunk of its prompt.
    tokens: Vec<u32>,
    /// Whether they are all it has not cached, so that the step gives its next token.
    complete: bool,
    /// Its place in the policy's order.
    rank: (i64, std::time::Instant),
    kv: Mut<'w, Kv>,
    logits: Mut<'w, Logits>,
    state: Mut<'w, SeqState>,
    timing: Mut<'w, Timing>,
    prefill: bool,
}

/// What shapes a step besides its budget: the plugins of this family that are enabled.
#[derive(bevy_ecs::system::SystemParam)]
struct Options<'w> {
    budget: Res<'w, StepBudget>,
    ranking: Option<Res<'w, Ranking>>,
    chunks: Option<Res<'w, PrefillInChunks>>,
    preemption: Option<Res<'w, PreemptByRecompute>>,
}

/// One batched forward over the running requests' uncached tokens within the step's budget.
/// A request whose tokens cannot be fed fails alone; one left out of the step, or in the
/// middle of its prompt, gets no logits and so no token this step.
fn forward(
    model: Res<ModelResource>,
    options: Options,
    mut metrics: ResMut<Metrics>,
    mut running: Query<(
        &Tokens,
        &SamplingParams,
        &mut Kv,
        &mut Logits,
        &mut SeqState,
        &mut Timing,
    )>,
) {
    let model = &model.0;
    let budget = *options.budget;
    let mut feeds = Vec::new();
    for (tokens, params, mut kv, mut logits, mut state, timing) in &mut running {
        if *state != SeqState::Running {
            continue;
        }
        logits.0.clear();
        let Some(ranking) = &options.ranking else {
            *state = SeqState::Failed(
                "no scheduling policy is enabled (the `fcfs` or `priority` plugin)".into(),
            );
            continue;
        };
        if kv.0.len(0) == 0 {
            let all: Vec<u32> = (0..tokens.len()).map(|i| tokens.get(i)).collect();
            let reused = kv.0.reuse_prefix(&all, params.cache_salt.as_deref());
            metrics.prefix_hit_tokens += reused as u64;
        }
        let cached = kv.0.len(0);
        let feed: Vec<u32> = (cached..tokens.len()).map(|i| tokens.get(i)).collect();
        if let Err(e) = model.check_feed(&feed, cached) {
            *state = SeqState::Failed(format!("{e:#}"));
            continue;
        }
        feeds.push(Feed {
            tokens: feed,
            complete: true,
            rank: (ranking.0)(params, &timing),
            kv,
            logits,
            state,
            timing,
            prefill: cached < tokens.prompt.len(),
        });
    }
    feeds.sort_by_key(|f| (f.tokens.len() > 1, f.rank));
    // The requests this step leaves out still hold blocks that a scheduled one may need.
    let mut idle = feeds.split_off(budget.max_num_seqs.min(feeds.len()));
    let mut left = budget.max_num_batched_tokens;
    let mut i = 0;
    while i < feeds.len() {
        let feed = &mut feeds[i];
        let mut take = feed.tokens.len().min(left);
        if take < feed.tokens.len() && options.chunks.is_none() {
            // Whole or not at all: a prompt longer than the whole budget runs in a step that
            // has nothing else.
            take = if left == budget.max_num_batched_tokens {
                feed.tokens.len()
            } else {
                0
            };
        }
        left = left.saturating_sub(take);
        feed.complete = take == feed.tokens.len();
        feed.tokens.truncate(take);
        if take == 0 {
            idle.push(feeds.remove(i));
        } else {
            i += 1;
        }
    }
    feeds.sort_by_key(|f| f.rank);
    reserve_blocks(
        model,
        &mut feeds,
        &mut idle,
        options.preemption.is_some(),
        &mut metrics,
    );
    if feeds.is_empty() {
        return;
    }
    let step_tokens = feeds.iter().map(|f| f.tokens.len()).sum();
    metrics.largest_step_tokens = metrics.largest_step_tokens.max(step_tokens);
    let started = std::time::Instant::now();
    let mut batch: Vec<BatchEntry<'_>> = feeds
        .iter_mut()
        .map(
            |Feed {
                 tokens,
                 kv,
                 complete,
                 ..
             }| BatchEntry {
                tokens,
                kv: kv.0.as_mut(),
                logits: if *complete {
                    Wanted::Last
                } else {
                    Wanted::None
                },
            },
        )
        .collect();
    let result = model.forward_batch(&mut batch);
    drop(batch);
    let elapsed = started.elapsed();
    match result {
        Ok(outputs) => {
            for (mut feed, out) in feeds.into_iter().zip(outputs) {
                feed.logits.0 = out.data;
                if feed.prefill {
                    feed.timing.prefill += elapsed;
                } else {
                    feed.timing.decode += elapsed;
                    feed.timing.decode_steps += 1;
                }
            }
        }
        Err(e) => {
            for mut feed in feeds {
                *feed.state = SeqState::Failed(format!("{e:#}"));
            }
        }
    }
}

/// Room in the KV pool for every feed, in scheduling order. When the pool runs short and
/// `preempt` is on, the newest running request that holds blocks — scheduled this step or
/// not — or the feed itself gives its blocks back and waits, to be recomputed when it is
/// admitted again (its tokens so far kept); with it off, the feed that found no room fails. A
/// request the whole pool could not hold fails either way, with the numbers.
fn reserve_blocks(
    model: &Model,
    feeds: &mut Vec<Feed<'_>>,
    idle: &mut Vec<Feed<'_>>,
    preempt: bool,
    metrics: &mut Metrics,
) {
    let holds_blocks = |f: &Feed<'_>| f.kv.0.len(0) > 0;
    let mut i = 0;
    while i < feeds.len() {
        let feed = &mut feeds[i];
        let mut victim = match feed.kv.0.reserve(&feed.tokens) {
            Ok(()) => {
                i += 1;
                continue;
            }
            Err(full) if full.never_fits || !preempt => {
                let mut feed = feeds.remove(i);
                feed.kv.0 = model.new_sequence();
                *feed.state = SeqState::Failed(if preempt {
                    format!("{full}")
                } else {
                    format!("{full}; with the `preemption` plugin it would wait for room")
                });
                continue;
            }
            Err(_) => {
                let scheduled = (i..feeds.len())
                    .filter(|&j| j == i || holds_blocks(&feeds[j]))
                    .max_by_key(|&j| feeds[j].rank)
                    .expect("the feed that failed is a candidate");
                let waiting = (0..idle.len())
                    .filter(|&j| holds_blocks(&idle[j]))
                    .max_by_key(|&j| idle[j].rank);
                match waiting {
                    Some(j) if idle[j].rank > feeds[scheduled].rank => idle.swap_remove(j),
                    _ => feeds.remove(scheduled),
                }
            }
        };
        // A request that holds nothing only waits.
        if holds_blocks(&victim) {
            metrics.preempted += 1;
        }
        victim.kv.0 = model.new_sequence();
        *victim.state = SeqState::Waiting;
    }
}
