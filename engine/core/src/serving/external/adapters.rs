//! The systems that call third-party extensions: admission policies in Admit, logits
//! processors and samplers in Sample, text filters in Filter, monitors in Monitor.
//!
//! Every call into a plugin comes back as a value: the SDK's adapters catch panics inside the
//! plugin. A plugin that panicked is disabled at the end of the step and reported; the request
//! it was serving fails or goes on without it, as the plugin's manifest asks.

use std::sync::{Mutex, PoisonError};

use bevy_ecs::prelude::*;
use vibee_sdk::abi_stable::std_types::{RErr, ROk, RSlice, RSliceMut, RStr};
use vibee_sdk::{
    AdmissionPolicyBox, Candidate, Decision, Event, EventKind, Fault, FilterAction, Load,
    LogitsProcessorBox, MonitorBox, PanicPolicy, SamplerBox, SamplingSettings, Sequence,
    TextFilterBox,
};

use super::{fault_text, PluginConfigs};
use crate::app::{App, EnabledPlugins, Order, Stage};
use crate::serving::pipeline::{
    Logits, Metrics, NextToken, SamplingParams, SeqState, Timing, Tokens,
};
use crate::serving::text::TextStream;

pub(super) enum Extension {
    LogitsProcessor(LogitsProcessorBox),
    Sampler(SamplerBox),
    TextFilter(TextFilterBox),
    Monitor(MonitorBox),
    AdmissionPolicy(AdmissionPolicyBox),
}

/// One instance of a plugin's extension. The `Mutex` only makes the instance `Sync` for the
/// world; systems reach it through `&mut` and never lock.
struct Attached<T> {
    plugin: &'static str,
    on_panic: PanicPolicy,
    inner: Mutex<T>,
}

impl<T> Attached<T> {
    fn get(&mut self) -> &mut T {
        self.inner.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    /// What a fault does: a panic disables the plugin; the request fails or goes on, per
    /// the plugin's policy (`state` is `None` where the plugin cannot fail a request).
    fn on_fault(
        &self,
        fault: Fault,
        state: Option<&mut SeqState>,
        enabled: &mut EnabledPlugins,
        faults: &mut PluginFaults,
    ) {
        let (plugin, on_panic) = (self.plugin, self.on_panic);
        let what = fault_text(&fault);
        if fault.panicked {
            enabled.0.remove(plugin);
            tracing::error!("plugin `{plugin}` {what}; it is disabled");
            faults.0.push((plugin.to_string(), what.clone()));
        }
        match (on_panic, state) {
            (PanicPolicy::FailRequest, Some(state)) => {
                *state = SeqState::Failed(format!("plugin `{plugin}` {what}"));
            }
            _ => tracing::warn!("plugin `{plugin}` {what}; the request goes on without it"),
        }
    }
}

/// The live instances of every third-party extension, in the order they were enabled.
#[derive(Resource, Default)]
pub struct Extensions {
    logits_processors: Vec<Attached<LogitsProcessorBox>>,
    samplers: Vec<Attached<SamplerBox>>,
    filters: Vec<Attached<TextFilterBox>>,
    monitors: Vec<Attached<MonitorBox>>,
    admission_policies: Vec<Attached<AdmissionPolicyBox>>,
}

impl Extensions {
    /// Adds an instance, replacing the plugin's previous one (a reloaded library).
    pub(super) fn attach(
        &mut self,
        plugin: &'static str,
        on_panic: PanicPolicy,
        extension: Extension,
    ) {
        self.logits_processors.retain(|a| a.plugin != plugin);
        self.samplers.retain(|a| a.plugin != plugin);
        self.filters.retain(|a| a.plugin != plugin);
        self.monitors.retain(|a| a.plugin != plugin);
        self.admission_policies.retain(|a| a.plugin != plugin);
        fn attached<T>(plugin: &'static str, on_panic: PanicPolicy, inner: T) -> Attached<T> {
            Attached {
                plugin,
                on_panic,
                inner: Mutex::new(inner),
            }
        }
        match extension {
            Extension::LogitsProcessor(e) => {
                self.logits_processors.push(attached(plugin, on_panic, e))
            }
            Extension::Sampler(e) => self.samplers.push(attached(plugin, on_panic, e)),
            Extension::TextFilter(e) => self.filters.push(attached(plugin, on_panic, e)),
            Extension::Monitor(e) => self.monitors.push(attached(plugin, on_panic, e)),
            Extension::AdmissionPolicy(e) => {
                self.admission_policies.push(attached(plugin, on_panic, e))
            }
        }
    }
}

/// Plugins that panicked, with what they said: reported by `vibee` and kept for inspection.
#[derive(Resource, Debug, Default, Clone)]
pub struct PluginFaults(pub Vec<(String, String)>);

/// Installs the systems that call third-party extensions; a plugin's `build` only attaches
/// its instance.
pub fn install(app: &mut App) {
    app.world.init_resource::<Extensions>();
    app.world.init_resource::<PluginFaults>();
    app.world.init_resource::<PluginConfigs>();
    app.add_systems_at(Stage::Admit, Order::Early, admit_by_policy);
    app.add_systems_at(Stage::Sample, Order::Early, process_logits);
    app.add_systems_at(Stage::Sample, Order::Main, sample_external);
    app.add_systems_at(Stage::Filter, Order::Main, filter_text);
    app.add_systems_at(Stage::Monitor, Order::Late, report_events);
}

/// A request's tokens as a plugin sees them.
fn sequence(entity: Entity, tokens: &Tokens) -> Sequence<'_> {
    Sequence {
        id: entity.to_bits(),
        prompt: RSlice::from_slice(&tokens.prompt),
        generated: RSlice::from_slice(&tokens.generated),
    }
}

fn process_logits(
    mut extensions: ResMut<Extensions>,
    mut enabled: ResMut<EnabledPlugins>,
    mut faults: ResMut<PluginFaults>,
    mut running: Query<(Entity, &Tokens, &mut Logits, &mut SeqState)>,
) {
    for (entity, tokens, mut logits, mut state) in &mut running {
        for attached in &mut extensions.logits_processors {
            if *state != SeqState::Running
                || logits.0.is_empty()
                || !enabled.0.contains(attached.plugin)
            {
                continue;
            }
            let seq = sequence(entity, tokens);
            let logits = RSliceMut::from_mut_slice(&mut logits.0);
            if let RErr(fault) = attached.get().process(seq, logits) {
                attached.on_fault(fault, Some(&mut state), &mut enabled, &mut faults);
            }
        }
    }
}

fn sample_external(
    mut extensions: ResMut<Extensions>,
    mut enabled: ResMut<EnabledPlugins>,
    mut faults: ResMut<PluginFaults>,
    mut running: Query<(
        Entity,
        &Tokens,
        &SamplingParams,
        &Logits,
        &mut NextToken,
        &mut SeqState,
    )>,
) {
    for (entity, tokens, params, logits, mut next, mut state) in &mut running {
        // The `sampler` slot is exclusive: at most one sampler is enabled.
        let Some(attached) = extensions
            .samplers
            .iter_mut()
            .find(|a| enabled.0.contains(a.plugin))
        else {
            return;
        };
        if *state != SeqState::Running || logits.0.is_empty() {
            continue;
        }
        let seq = sequence(entity, tokens);
        let settings = SamplingSettings {
            temperature: params.temperature,
            top_k: params.top_k as u64,
            top_p: params.top_p,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            seed: params.seed,
        };
        match attached
            .get()
            .sample(seq, RSlice::from_slice(&logits.0), settings)
        {
            ROk(token) if (token as usize) < logits.0.len() => next.0 = Some(token),
            ROk(token) => {
                *state = SeqState::Failed(format!(
                    "sampler `{}` chose token {token}, outside the vocabulary ({})",
                    attached.plugin,
                    logits.0.len()
                ))
            }
            RErr(fault) => attached.on_fault(fault, Some(&mut state), &mut enabled, &mut faults),
        }
    }
}

/// Requests a policy deferred this step: the engine's admission skips them.
#[derive(Component)]
pub struct Deferred;

fn admit_by_policy(
    mut commands: Commands,
    mut extensions: ResMut<Extensions>,
    mut enabled: ResMut<EnabledPlugins>,
    mut faults: ResMut<PluginFaults>,
    mut requests: Query<(Entity, &Tokens, &SamplingParams, &Timing, &mut SeqState)>,
    deferred: Query<Entity, With<Deferred>>,
) {
    // Every deferral lasts one step; a policy that still wants to wait says so again.
    for entity in &deferred {
        commands.entity(entity).remove::<Deferred>();
    }
    if !extensions
        .admission_policies
        .iter()
        .any(|a| enabled.0.contains(a.plugin))
    {
        return;
    }
    let mut load = Load {
        running: 0,
        running_tokens: 0,
        waiting: 0,
    };
    let mut waiting = Vec::new();
    for (entity, tokens, _, timing, state) in &requests {
        match *state {
            SeqState::Running => {
                load.running += 1;
                load.running_tokens += tokens.len() as u64;
            }
            SeqState::Waiting => waiting.push((timing.submitted, entity)),
            _ => {}
        }
    }
    load.waiting = waiting.len() as u64;
    // First come, first considered.
    waiting.sort();
    for (_, entity) in waiting {
        let Ok((_, tokens, params, timing, mut state)) = requests.get_mut(entity) else {
            continue;
        };
        let candidate = Candidate {
            seq: entity.to_bits(),
            prompt_tokens: tokens.prompt.len() as u64,
            max_tokens: params.max_tokens as u64,
            waited_ms: timing.submitted.elapsed().as_millis() as u64,
        };
        let mut decision = Decision::Admit;
        for attached in &mut extensions.admission_policies {
            if decision != Decision::Admit || !enabled.0.contains(attached.plugin) {
                continue;
            }
            match attached.get().admit(candidate, load) {
                ROk(admission) => {
                    decision = admission.decision;
                    if decision == Decision::Reject {
                        *state = SeqState::Failed(format!(
                            "admission policy `{}` rejected the request: {}",
                            attached.plugin, admission.reason
                        ));
                    }
                }
                RErr(fault) => {
                    attached.on_fault(fault, Some(&mut state), &mut enabled, &mut faults);
                    if *state != SeqState::Waiting {
                        decision = Decision::Reject;
                    }
                }
            }
        }
        load.waiting -= 1;
        match decision {
            Decision::Admit => {
                load.running += 1;
                load.running_tokens += tokens.len() as u64;
            }
            Decision::Defer => {
                commands.entity(entity).insert(Deferred);
            }
            Decision::Reject => {}
        }
    }
}

fn filter_text(
    mut extensions: ResMut<Extensions>,
    mut enabled: ResMut<EnabledPlugins>,
    mut faults: ResMut<PluginFaults>,
    mut running: Query<(Entity, &NextToken, &mut TextStream, &mut SeqState)>,
) {
    for (entity, next, mut text, mut state) in &mut running {
        for attached in &mut extensions.filters {
            let waiting = text.delta.is_empty() && !text.finishing;
            if *state != SeqState::Running
                || next.0.is_none()
                || text.stop.is_some()
                || waiting
                || !enabled.0.contains(attached.plugin)
            {
                continue;
            }
            let delta = RStr::from_str(&text.delta);
            match attached
                .get()
                .on_text(entity.to_bits(), delta, text.finishing)
            {
                RErr(fault) => {
                    attached.on_fault(fault, Some(&mut state), &mut enabled, &mut faults);
                }
                ROk(verdict) => {
                    text.delta = verdict.release.into_string();
                    let why = format!("{}: {}", attached.plugin, verdict.reason);
                    match verdict.action {
                        FilterAction::Continue => {}
                        FilterAction::Flag => text.flags.push(why),
                        FilterAction::Stop => text.stop = Some(why),
                    }
                }
            }
        }
    }
}

/// How far the monitors have seen a request.
#[derive(Component, Default)]
struct Reported {
    flags: usize,
}

type Observed<'a> = (
    Entity,
    Ref<'a, SeqState>,
    Ref<'a, Tokens>,
    Option<&'a TextStream>,
    Option<&'a mut Reported>,
);

fn report_events(
    mut commands: Commands,
    mut extensions: ResMut<Extensions>,
    mut enabled: ResMut<EnabledPlugins>,
    mut faults: ResMut<PluginFaults>,
    metrics: Res<Metrics>,
    mut requests: Query<Observed>,
) {
    for (entity, state, tokens, text, reported) in &mut requests {
        let seq = entity.to_bits();
        let mut events: Vec<(EventKind, u32, u64, String)> = Vec::new();
        if state.is_changed() && *state == SeqState::Running {
            events.push((
                EventKind::Admitted,
                0,
                tokens.prompt.len() as u64,
                String::new(),
            ));
        }
        if tokens.is_changed() {
            if let Some(&token) = tokens.generated.last() {
                events.push((
                    EventKind::Token,
                    token,
                    tokens.generated.len() as u64,
                    String::new(),
                ));
            }
        }
        let seen = reported.as_ref().map_or(0, |r| r.flags);
        let flags = text.map_or(&[][..], |t| &t.flags[..]);
        for flag in &flags[seen.min(flags.len())..] {
            events.push((EventKind::Flagged, 0, 0, flag.clone()));
        }
        match reported {
            Some(mut r) => r.flags = flags.len(),
            None => {
                commands
                    .entity(entity)
                    .insert(Reported { flags: flags.len() });
            }
        }
        let ended =
            state.is_changed() && matches!(*state, SeqState::Finished(_) | SeqState::Failed(_));
        match &*state {
            SeqState::Finished(reason) if ended => events.push((
                EventKind::Finished,
                0,
                tokens.generated.len() as u64,
                serde_json::to_value(reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
            )),
            SeqState::Failed(why) if ended => events.push((
                EventKind::Failed,
                0,
                tokens.generated.len() as u64,
                why.clone(),
            )),
            _ => {}
        }
        for attached in &mut extensions.monitors {
            if !enabled.0.contains(attached.plugin) {
                continue;
            }
            for (kind, token, count, detail) in &events {
                let event = Event {
                    kind: *kind,
                    seq,
                    step: metrics.steps,
                    token: *token,
                    count: *count,
                    detail: RStr::from_str(detail),
                };
                if let RErr(fault) = attached.get().on_event(event) {
                    // A monitor only watches: its faults never fail the request.
                    attached.on_fault(fault, None, &mut enabled, &mut faults);
                    break;
                }
            }
        }
        if ended {
            for attached in &mut extensions.logits_processors {
                if !enabled.0.contains(attached.plugin) {
                    continue;
                }
                if let RErr(fault) = attached.get().finish(seq) {
                    attached.on_fault(fault, None, &mut enabled, &mut faults);
                }
            }
        }
    }
}
