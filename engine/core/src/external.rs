//! Third-party plugins: `cdylib`s built on vibee-sdk, loaded from disk and adapted into the
//! serving pipeline's systems (logits processors in Sample, text filters in Filter, monitors
//! in Monitor).
//!
//! Every call into a plugin comes back as a value: the SDK's adapters catch panics inside the
//! plugin. A plugin that panicked is disabled at the end of the step and reported; the request
//! it was serving fails or goes on without it, as the plugin's manifest asks.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Mutex, PoisonError};

use anyhow::{bail, Context};
use bevy_ecs::prelude::*;
use vibee_sdk::abi_stable::library::{lib_header_from_raw_library, LibraryError, RawLibrary};
use vibee_sdk::abi_stable::std_types::{RErr, ROk, RResult, RSlice, RSliceMut, RStr};
use vibee_sdk::{
    AdmissionPolicyBox, Candidate, Decision, EvalMetricBox, Event, EventKind, Fault, FilterAction,
    Load, LogitsProcessorBox, Manifest, MonitorBox, PanicPolicy, PluginModuleRef, SamplerBox,
    SamplingSettings, Sequence, TextFilterBox,
};

use crate::app::{App, EnabledPlugins, Order, Stage};
use crate::pipeline::{Logits, Metrics, NextToken, SamplingParams, SeqState, Timing, Tokens};
use crate::plugin::{Plugin, PluginSpec};
use crate::registry::{SpecEntry, Status, FAMILIES};
use crate::text::{TextStream, TokenizerResource};

/// Configuration strings for third-party plugins, by plugin name (`--plugin-config`).
#[derive(Resource, Debug, Default, Clone)]
pub struct PluginConfigs(pub BTreeMap<String, String>);

/// A plugin library loaded from disk.
pub struct ExternalPlugin {
    pub manifest: Manifest,
    /// The file it was loaded from.
    pub origin: PathBuf,
    id: &'static str,
    name: &'static str,
    module: PluginModuleRef,
}

/// The extension kinds a library can provide, as the host names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    LogitsProcessor,
    Sampler,
    TextFilter,
    Monitor,
    AdmissionPolicy,
    EvalMetric,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::LogitsProcessor => "logits processor",
            Kind::Sampler => "sampler",
            Kind::TextFilter => "text filter",
            Kind::Monitor => "monitor",
            Kind::AdmissionPolicy => "admission policy",
            Kind::EvalMetric => "eval metric",
        }
    }
}

/// Loads every plugin library in `path` (a library file, or a directory of them).
pub fn load_path(path: &Path) -> anyhow::Result<Vec<ExternalPlugin>> {
    if !path.is_dir() {
        return Ok(vec![ExternalPlugin::load(path)?]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot read the plugin directory {}", path.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(std::env::consts::DLL_SUFFIX))
        })
        .collect();
    files.sort();
    files.iter().map(|f| ExternalPlugin::load(f)).collect()
}

impl ExternalPlugin {
    /// Loads a fresh copy of the library at `path`, so a rebuilt library at the same path is
    /// a new library rather than the one the process already mapped. Its ABI is checked
    /// before anything in it runs.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read plugin library {}", path.display()))?;
        static COPIES: AtomicU64 = AtomicU64::new(0);
        let copies = std::env::temp_dir().join("vibee-plugins");
        std::fs::create_dir_all(&copies)
            .with_context(|| format!("cannot create {}", copies.display()))?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plugin");
        let copy = copies.join(format!(
            "{stem}-{}-{}{}",
            std::process::id(),
            COPIES.fetch_add(1, AtomicOrdering::Relaxed),
            std::env::consts::DLL_SUFFIX
        ));
        std::fs::write(&copy, bytes).with_context(|| format!("cannot write {}", copy.display()))?;
        let loaded = Self::load_copy(&copy, path);
        // The mapping outlives the file; nothing needs the copy once it is loaded (or refused).
        let _ = std::fs::remove_file(&copy);
        loaded.with_context(|| format!("cannot load plugin {}", path.display()))
    }

    fn load_copy(copy: &Path, origin: &Path) -> anyhow::Result<Self> {
        let raw = RawLibrary::load_at(copy).map_err(describe)?;
        // SAFETY: the header refers into the library, which is never unloaded: abi_stable's
        // layout checker keeps references into every library it has checked, so unmapping
        // one would leave them dangling. A replaced library's instances are dropped; its code
        // stays mapped.
        let raw: &'static RawLibrary = Box::leak(Box::new(raw));
        let header = unsafe { lib_header_from_raw_library(raw) }.map_err(describe)?;
        let module = header
            .init_root_module::<PluginModuleRef>()
            .map_err(describe)?;
        let manifest = (module.manifest())();
        let (id, name) = check_manifest(&manifest)?;
        let plugin = Self {
            manifest,
            origin: origin.to_path_buf(),
            id,
            name,
            module,
        };
        plugin.kind()?;
        Ok(plugin)
    }

    /// The one extension the library provides.
    pub fn kind(&self) -> anyhow::Result<Kind> {
        let m = self.module;
        let offered: Vec<Kind> = [
            (
                m.new_logits_processor().flatten().is_some(),
                Kind::LogitsProcessor,
            ),
            (m.new_sampler().flatten().is_some(), Kind::Sampler),
            (m.new_text_filter().flatten().is_some(), Kind::TextFilter),
            (m.new_monitor().flatten().is_some(), Kind::Monitor),
            (
                m.new_admission_policy().flatten().is_some(),
                Kind::AdmissionPolicy,
            ),
            (m.new_eval_metric().flatten().is_some(), Kind::EvalMetric),
        ]
        .into_iter()
        .filter_map(|(has, kind)| has.then_some(kind))
        .collect();
        match offered[..] {
            [kind] => Ok(kind),
            [] => bail!(
                "plugin `{}` provides no extension this vibee knows",
                self.name
            ),
            _ => bail!("plugin `{}` provides more than one extension", self.name),
        }
    }

    /// The registry entry the plugin adds: its spec, with where it came from. A sampler fills
    /// the exclusive `sampler` slot, in place of vibee's.
    pub fn registry_entry(&self) -> SpecEntry {
        let m = &self.manifest;
        let kind = self.kind().ok();
        SpecEntry {
            id: self.id.into(),
            name: self.name.into(),
            family: m.family.to_string(),
            summary: m.summary.to_string(),
            status: Status::Implemented,
            requires: Vec::new(),
            conflicts: Vec::new(),
            provides: (kind == Some(Kind::Sampler)).then(|| "sampler".to_string()),
            default: false,
            conformance: None,
            origin: Some(format!(
                "{} {}, {}",
                self.origin.display(),
                m.version,
                kind.map_or("?", Kind::as_str)
            )),
        }
    }

    fn instantiate(&self, config: &str) -> anyhow::Result<Extension> {
        let m = self.module;
        let config = RStr::from_str(config);
        let made = match self.kind()? {
            Kind::LogitsProcessor => constructed(m.new_logits_processor().flatten(), config)
                .map(Extension::LogitsProcessor),
            Kind::Sampler => constructed(m.new_sampler().flatten(), config).map(Extension::Sampler),
            Kind::TextFilter => {
                constructed(m.new_text_filter().flatten(), config).map(Extension::TextFilter)
            }
            Kind::Monitor => constructed(m.new_monitor().flatten(), config).map(Extension::Monitor),
            Kind::AdmissionPolicy => constructed(m.new_admission_policy().flatten(), config)
                .map(Extension::AdmissionPolicy),
            Kind::EvalMetric => bail!(
                "`{}` is an eval metric: it scores outputs (`vibee score`), it does not run in \
                 the serving pipeline",
                self.name
            ),
        };
        made.map_err(|fault| anyhow::anyhow!("{}", fault_text(&fault)))
    }

    /// An instance of an eval-metric plugin, configured with `config`.
    pub fn eval_metric(&self, config: &str) -> anyhow::Result<EvalMetric> {
        let constructor = self
            .module
            .new_eval_metric()
            .flatten()
            .with_context(|| format!("`{}` is not an eval metric", self.name))?;
        let metric = constructed(Some(constructor), RStr::from_str(config))
            .map_err(|fault| anyhow::anyhow!("{}", fault_text(&fault)))?;
        Ok(EvalMetric {
            plugin: self.name,
            inner: metric,
        })
    }
}

/// A third-party eval metric, called directly rather than from a pipeline stage.
pub struct EvalMetric {
    plugin: &'static str,
    inner: EvalMetricBox,
}

impl EvalMetric {
    pub fn score(&mut self, prediction: &str, reference: &str) -> anyhow::Result<f64> {
        self.inner
            .score(RStr::from_str(prediction), RStr::from_str(reference))
            .into_result()
            .map_err(|fault| anyhow::anyhow!("metric `{}` {}", self.plugin, fault_text(&fault)))
    }
}

fn constructed<T>(
    constructor: Option<extern "C" fn(RStr<'_>) -> RResult<T, Fault>>,
    config: RStr<'_>,
) -> Result<T, Fault> {
    let constructor = constructor.expect("kind() found the constructor");
    constructor(config).into_result()
}

fn fault_text(fault: &Fault) -> String {
    if fault.panicked {
        format!("panicked: {}", fault.message)
    } else {
        fault.message.to_string()
    }
}

fn describe(e: LibraryError) -> anyhow::Error {
    match e {
        LibraryError::GetSymbolError { .. } => {
            anyhow::anyhow!("it is not a vibee plugin (it exports no vibee-sdk root module)")
        }
        LibraryError::AbiInstability(report) => {
            // The full report dumps both type layouts; its verdict is the last paragraph.
            let report = report.to_string();
            tracing::debug!("abi_stable's layout report:\n{report}");
            let verdict = report
                .rfind("\nError:")
                .map_or(report.as_str(), |i| &report[i + 1..]);
            anyhow::anyhow!(
                "its vibee-sdk types do not match this vibee's (vibee-sdk {}); rebuild it \
                 against this vibee-sdk ({})",
                env!("CARGO_PKG_VERSION"),
                verdict.split_whitespace().collect::<Vec<_>>().join(" ")
            )
        }
        other => anyhow::anyhow!("{other}"),
    }
}

/// Checks what a manifest claims and gives the plugin's id and name, interned: plugin names
/// live as long as the process (a reloaded library reuses its predecessor's).
fn check_manifest(m: &Manifest) -> anyhow::Result<(&'static str, &'static str)> {
    let name = m.name.as_str();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bail!("plugin name `{name}` must be lowercase letters, digits and dashes");
    }
    let Some((_, _, lo, hi)) = FAMILIES.iter().find(|(f, ..)| *f == m.family.as_str()) else {
        let names: Vec<_> = FAMILIES.iter().map(|(f, ..)| *f).collect();
        bail!(
            "plugin `{name}` names unknown family `{}`; families: {}",
            m.family,
            names.join(", ")
        );
    };
    let number: Option<u32> = m.spec.strip_prefix('v').and_then(|n| n.parse().ok());
    match number {
        Some(n) if (*lo..=*hi).contains(&n) => {}
        _ => bail!(
            "plugin `{name}` claims spec `{}`, which is not an id of family {} (v{lo}–v{hi})",
            m.spec,
            m.family
        ),
    }
    Ok((intern(m.spec.as_str()), intern(name)))
}

fn intern(s: &str) -> &'static str {
    static NAMES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut names = NAMES.lock().unwrap_or_else(PoisonError::into_inner);
    match names.get(s) {
        Some(interned) => interned,
        None => {
            let interned: &'static str = Box::leak(s.to_string().into_boxed_str());
            names.insert(interned);
            interned
        }
    }
}

impl Plugin for ExternalPlugin {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: self.id,
            name: self.name,
        }
    }

    fn external(&self) -> Option<&ExternalPlugin> {
        Some(self)
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        let config = app
            .world
            .get_resource::<PluginConfigs>()
            .and_then(|c| c.0.get(self.name))
            .cloned()
            .unwrap_or_default();
        let extension = self.instantiate(&config)?;
        if matches!(extension, Extension::TextFilter(_))
            && !app.world.contains_resource::<TokenizerResource>()
        {
            bail!("a text filter needs the model's tokenizer.json, and this model has none");
        }
        app.world
            .get_resource_mut::<Extensions>()
            .context("third-party plugins run in the serving pipeline")?
            .attach(self.name, self.manifest.on_panic, extension);
        Ok(())
    }
}

enum Extension {
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
    fn attach(&mut self, plugin: &'static str, on_panic: PanicPolicy, extension: Extension) {
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
            let seq = Sequence {
                id: entity.to_bits(),
                prompt: RSlice::from_slice(&tokens.prompt),
                generated: RSlice::from_slice(&tokens.generated),
            };
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
        let seq = Sequence {
            id: entity.to_bits(),
            prompt: RSlice::from_slice(&tokens.prompt),
            generated: RSlice::from_slice(&tokens.generated),
        };
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
