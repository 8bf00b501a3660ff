//! Spec conformance cases (`specs/<id>-<name>.ron`) and their runner.
//!
//! Expected values come from independent references: fixtures written by Hugging Face
//! transformers (`tests/fixtures/make_fixtures.py`). Property cases compare two vibee
//! configurations that must agree by construction of the technique.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context};
use bevy_ecs::prelude::{Entity, Resource};
use serde::{Deserialize, Serialize};

use crate::app::plugin::{resolve, Plugin};
use crate::app::registry::Registry;
use crate::app::{App, Pipeline, Stage};
use crate::backend::tensor::Matrix;
use crate::model::{BatchEntry, Model, Wanted};
use crate::serving::engine::Engine;
use crate::serving::external::{find_external, PluginConfigs};
use crate::serving::pipeline::{
    request_bundle, FinishReason, Kv, Logits, Metrics, NextToken, SamplingParams, SeqState,
    StepBudget, Tokens,
};
use crate::serving::runner;
use crate::serving::text::TextStream;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecCases {
    pub spec: String,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub check: Check,
}

#[derive(Debug, Deserialize)]
pub enum Check {
    /// Logits of every prompt position match the transformers reference (its `decode_logits`
    /// where the fixture has them: quantized weights take int8 activations in every path).
    ReferenceLogits {
        fixture: String,
        plugins: Vec<String>,
        max_abs_err: f32,
        /// Plugin configurations, as `--plugin-config NAME=CONFIG` gives them.
        #[serde(default)]
        configs: BTreeMap<String, String>,
    },
    /// The last-position logits after the fixture's long prompt (2,048 tokens) match.
    ReferenceLongPrompt {
        fixture: String,
        plugins: Vec<String>,
        max_abs_err: f32,
    },
    /// The greedy continuation equals transformers' `generate`, token for token.
    ReferenceGreedy {
        fixture: String,
        plugins: Vec<String>,
    },
    /// Feeding the prompt one token at a time through the cache (the decode path) gives the
    /// reference's `decode_logits` (else its logits) at every position.
    ReferenceDecodeLogits {
        fixture: String,
        plugins: Vec<String>,
        max_abs_err: f32,
        #[serde(default)]
        configs: BTreeMap<String, String>,
    },
    /// Feeding the prompt one token at a time through the cache gives the logits of one
    /// forward over the whole prompt.
    IncrementalEqualsFull {
        fixture: String,
        plugins: Vec<String>,
        max_abs_err: f32,
        #[serde(default)]
        configs: BTreeMap<String, String>,
    },
    /// Sequences of different lengths and at different points run in one batched forward
    /// give each the logits it gets alone: prefills of the prompt and of two cuts of it side
    /// by side, then a decode step of all three, then a decode step beside a prefill chunk.
    BatchEqualsSingle {
        fixture: String,
        plugins: Vec<String>,
        max_abs_err: f32,
        #[serde(default)]
        configs: BTreeMap<String, String>,
    },
    /// A second sequence with the same prompt takes the first one's cached blocks (a prefix
    /// cache hit) and gets, for the tokens it still runs, the logits the first one got.
    PrefixHitEqualsMiss {
        fixture: String,
        plugins: Vec<String>,
        max_abs_err: f32,
        #[serde(default)]
        configs: BTreeMap<String, String>,
    },
    /// A cache truncated after a rejected draft, and a fork of it that goes its own way, give
    /// the logits of sequences that never held the draft or the other branch.
    RollbackAndFork {
        fixture: String,
        plugins: Vec<String>,
        max_abs_err: f32,
        #[serde(default)]
        configs: BTreeMap<String, String>,
    },
    /// The prompt and its greedy continuation fed one token at a time through a paged cache
    /// with windowed layers never hold more than `max_blocks` blocks at once (those out of a
    /// layer's window go back to the pool), and give the logits of one full forward.
    WindowReleasesBlocks {
        fixture: String,
        plugins: Vec<String>,
        max_blocks: usize,
        max_abs_err: f32,
        #[serde(default)]
        configs: BTreeMap<String, String>,
    },
    /// Two plugin sets give the same logits on one checkpoint.
    SameLogits {
        fixture: String,
        a: Vec<String>,
        b: Vec<String>,
        max_abs_err: f32,
        #[serde(default)]
        configs: BTreeMap<String, String>,
    },
    /// Loading with these plugins fails with an error mentioning `mentions`.
    Rejects {
        fixture: String,
        plugins: Vec<String>,
        mentions: String,
    },
    /// The parameters an arch-search plugin counts for a `config.json` are within `rel_tol`
    /// (relative; 0 is exact) of the reference, in total and, where given, per token.
    ParameterCount {
        config: String,
        plugins: Vec<String>,
        total: f64,
        active: Option<f64>,
        rel_tol: f64,
    },
    /// The sampler, run through the Sample stage with `draws` seeds per parameter set, never
    /// picks a token transformers' logits processors filter out, and picks the others at
    /// their reference frequencies (within `max_sigma` binomial standard deviations).
    ReferenceSampling {
        reference: String,
        plugins: Vec<String>,
        draws: usize,
        max_sigma: f32,
    },
    /// A logits processor, run through the Sample stage on each reference case (its
    /// configuration, token history and scores), leaves the scores the reference processor
    /// did (`null` in the reference is a banned token, `-inf`).
    ReferenceLogitsProcessing {
        plugin: String,
        reference: String,
        max_abs_err: f32,
    },
    /// A text filter, fed each reference text token by token (the fixture's tokenizer) through
    /// the Filter and Emit stages, releases the reference's text, and flags and stops the
    /// request where the reference does.
    ReferenceTextFilter {
        fixture: String,
        plugin: String,
        reference: String,
    },
    /// A JSON-lines monitor (configured with the path of its log) records a greedy generation
    /// on the fixture: one `admitted` event with the prompt length, a `token` event for each of
    /// transformers' greedy tokens in order, then `finished` with reason `length`.
    MonitorLog { fixture: String, plugin: String },
    /// Requests with these prompt lengths, submitted together to an engine for the fixture
    /// with an admission policy, start running at these steps (1 is the first; `None`:
    /// rejected). Each running request makes one token per step, `max_tokens` in all.
    AdmissionSchedule {
        fixture: String,
        plugin: String,
        config: String,
        prompts: Vec<usize>,
        max_tokens: usize,
        admitted_at: Vec<Option<u64>>,
    },
    /// Requests for the fixture's prompt, each submitted before step `arrives` (1 is the
    /// first), run through an engine with these plugins and step budget. After step `s` request
    /// `r` holds `cached[s - 1][r]` tokens in its cache (0 before it runs, while it waits, and
    /// once it has ended); the requests named in `fail` fail and every other one generates
    /// transformers' greedy tokens; `preempted` requests gave their blocks back; and at the end
    /// every block is back in the pool.
    Schedule {
        fixture: String,
        plugins: Vec<String>,
        #[serde(default)]
        configs: BTreeMap<String, String>,
        max_num_batched_tokens: usize,
        max_num_seqs: usize,
        requests: Vec<ScheduledRequest>,
        cached: Vec<Vec<usize>>,
        #[serde(default)]
        preempted: u64,
        #[serde(default)]
        fail: Vec<usize>,
    },
    /// An eval metric scores each reference case's prediction against its reference as the
    /// reference implementation did.
    ReferenceMetric {
        plugin: String,
        reference: String,
        max_abs_err: f64,
    },
}

/// One request of a [`Check::Schedule`] case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduledRequest {
    pub arrives: u64,
    pub max_tokens: usize,
    #[serde(default)]
    pub priority: i64,
}

impl SpecCases {
    /// The same cases with plugin `from` replaced by `to`: how a third-party implementation
    /// of a spec is held to the spec's own cases.
    pub fn for_plugin(mut self, from: &str, to: &str) -> Self {
        let swap = |name: &mut String| {
            if name == from {
                *name = to.to_string();
            }
        };
        for case in &mut self.cases {
            match &mut case.check {
                Check::ReferenceLogits { plugins, .. }
                | Check::ReferenceLongPrompt { plugins, .. }
                | Check::ReferenceGreedy { plugins, .. }
                | Check::IncrementalEqualsFull { plugins, .. }
                | Check::BatchEqualsSingle { plugins, .. }
                | Check::PrefixHitEqualsMiss { plugins, .. }
                | Check::RollbackAndFork { plugins, .. }
                | Check::WindowReleasesBlocks { plugins, .. }
                | Check::ReferenceDecodeLogits { plugins, .. }
                | Check::Rejects { plugins, .. }
                | Check::ParameterCount { plugins, .. }
                | Check::Schedule { plugins, .. }
                | Check::ReferenceSampling { plugins, .. } => plugins.iter_mut().for_each(swap),
                Check::SameLogits { a, b, .. } => a.iter_mut().chain(b).for_each(swap),
                Check::ReferenceLogitsProcessing { plugin, .. }
                | Check::ReferenceTextFilter { plugin, .. }
                | Check::MonitorLog { plugin, .. }
                | Check::AdmissionSchedule { plugin, .. }
                | Check::ReferenceMetric { plugin, .. } => swap(plugin),
            }
        }
        self
    }
}

/// Counts a `config.json`'s total and per-token (active) parameters: the service an
/// arch-search plugin puts in the world.
#[derive(Resource, Clone, Copy)]
pub struct ParameterCounter(pub fn(&Path) -> anyhow::Result<(u64, u64)>);

/// transformers' next-token distributions for fixed logits (`make_sampling_fixtures.py`).
#[derive(Debug, Deserialize)]
struct SamplingReference {
    logits: Vec<f32>,
    history: Vec<u32>,
    cases: Vec<SamplingCase>,
}

#[derive(Debug, Deserialize)]
struct SamplingCase {
    /// The sampler fields transformers was given; the rest keep their defaults.
    params: SamplingParams,
    /// Configurations of third-party plugins (a sampler's own parameters).
    #[serde(default)]
    configs: BTreeMap<String, String>,
    probs: Vec<f32>,
}

/// What transformers produced for a fixture model.
#[derive(Debug, Deserialize)]
pub struct Reference {
    pub prompt_ids: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
    pub greedy_ids: Vec<u32>,
    #[serde(default)]
    pub long_prompt_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub long_last_logits: Option<Vec<f32>>,
    /// Logits with int8 activations into quantized matmuls (GGUF fixtures), as decode runs.
    #[serde(default)]
    pub decode_logits: Option<Vec<Vec<f32>>>,
}

impl Reference {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("reference.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is malformed", path.display()))
    }

    /// The logits vibee must reproduce, every position's in a row: with int8 activations
    /// into quantized products where the fixture has them (`decode_logits`), else `logits`.
    fn expected_logits(&self) -> Vec<f32> {
        self.decode_logits.as_ref().unwrap_or(&self.logits).concat()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub spec: String,
    pub case: String,
    pub backend: &'static str,
    pub max_err: Option<f32>,
    pub passed: bool,
    pub detail: String,
}

pub fn load_cases(path: &Path) -> anyhow::Result<SpecCases> {
    let text = crate::io::read_regular_text(path, crate::io::SMALL_FILE)?;
    parse_cases(&text, &path.display().to_string())
}

/// Parses conformance cases; `origin` names where the text came from in errors.
pub fn parse_cases(text: &str, origin: &str) -> anyhow::Result<SpecCases> {
    let cases: SpecCases = ron::from_str(text).map_err(|e| {
        anyhow::anyhow!(
            "{origin}:{}:{}: {}",
            e.position.line,
            e.position.col,
            e.code
        )
    })?;
    if cases.cases.is_empty() {
        bail!("{origin} has no conformance case");
    }
    Ok(cases)
}

/// Runs every case of a spec file; a case that cannot even run counts as a failure.
pub fn run_cases(
    cases: &SpecCases,
    root: &Path,
    registry: &Registry,
    catalog: &[Box<dyn Plugin>],
) -> Vec<CaseResult> {
    cases
        .cases
        .iter()
        .map(|case| {
            let outcome = run_check(&case.check, root, registry, catalog);
            let (max_err, passed, detail) = match outcome {
                Ok((err, None)) => (err, true, String::new()),
                Ok((err, Some(why))) => (err, false, why),
                Err(e) => (None, false, format!("{e:#}")),
            };
            CaseResult {
                spec: cases.spec.clone(),
                case: case.name.clone(),
                backend: "cpu",
                max_err,
                passed,
                detail,
            }
        })
        .collect()
}

type Outcome = (Option<f32>, Option<String>);

fn run_check(
    check: &Check,
    root: &Path,
    registry: &Registry,
    catalog: &[Box<dyn Plugin>],
) -> anyhow::Result<Outcome> {
    let load_configured = |fixture: &str, plugins: &[String], configs: &BTreeMap<_, _>| {
        Engine::load(
            &root.join(fixture),
            plugins,
            registry,
            catalog,
            &PluginConfigs(configs.clone()),
        )
    };
    let load =
        |fixture: &str, plugins: &[String]| load_configured(fixture, plugins, &BTreeMap::new());
    // A property of the model on the fixture's prompt: the logits `pair` computes two ways.
    type Pair = fn(&Engine, &[u32]) -> anyhow::Result<(Vec<f32>, Vec<f32>)>;
    let property = |fixture: &str, plugins: &[String], configs, max_abs_err, pair: Pair| {
        let reference = Reference::load(&root.join(fixture))?;
        let engine = load_configured(fixture, plugins, configs)?;
        let (got, expected) = pair(&engine, &reference.prompt_ids)?;
        anyhow::Ok(compare(&got, &expected, max_abs_err))
    };
    match check {
        Check::ReferenceLogits {
            fixture,
            plugins,
            max_abs_err,
            configs,
        } => {
            let reference = Reference::load(&root.join(fixture))?;
            let engine = load_configured(fixture, plugins, configs)?;
            let logits = full_logits(&engine, &reference.prompt_ids)?;
            Ok(compare(
                &logits.data,
                &reference.expected_logits(),
                *max_abs_err,
            ))
        }
        Check::ReferenceLongPrompt {
            fixture,
            plugins,
            max_abs_err,
        } => {
            let reference = Reference::load(&root.join(fixture))?;
            let (Some(prompt), Some(expected)) =
                (&reference.long_prompt_ids, &reference.long_last_logits)
            else {
                bail!("{fixture}/reference.json has no long-prompt reference");
            };
            let engine = load(fixture, plugins)?;
            let mut kv = engine.model.new_sequence();
            let logits = engine.model.forward(prompt, kv.as_mut(), false)?;
            Ok(compare(&logits.data, expected, *max_abs_err))
        }
        Check::ReferenceGreedy { fixture, plugins } => {
            let reference = Reference::load(&root.join(fixture))?;
            let mut engine = load(fixture, plugins)?;
            let params = SamplingParams {
                temperature: 0.0,
                max_tokens: reference.greedy_ids.len(),
                ignore_eos: true,
                ..SamplingParams::default()
            };
            let out = runner::generate(&mut engine.app, reference.prompt_ids.clone(), params)?;
            let why = (out.tokens != reference.greedy_ids).then(|| {
                format!(
                    "greedy tokens {:?}, transformers {:?}",
                    out.tokens, reference.greedy_ids
                )
            });
            Ok((None, why))
        }
        Check::IncrementalEqualsFull {
            fixture,
            plugins,
            max_abs_err,
            configs,
        } => property(fixture, plugins, configs, *max_abs_err, |engine, prompt| {
            Ok((
                stepped_logits(engine, prompt)?,
                full_logits(engine, prompt)?.data,
            ))
        }),
        Check::BatchEqualsSingle {
            fixture,
            plugins,
            max_abs_err,
            configs,
        } => property(fixture, plugins, configs, *max_abs_err, |engine, prompt| {
            batch_and_alone(&engine.model, prompt)
        }),
        Check::RollbackAndFork {
            fixture,
            plugins,
            max_abs_err,
            configs,
        } => property(fixture, plugins, configs, *max_abs_err, |engine, prompt| {
            rollback_and_fork(&engine.model, prompt)
        }),
        Check::WindowReleasesBlocks {
            fixture,
            plugins,
            max_blocks,
            max_abs_err,
            configs,
        } => {
            let reference = Reference::load(&root.join(fixture))?;
            let engine = load_configured(fixture, plugins, configs)?;
            let tokens: Vec<u32> = reference
                .prompt_ids
                .iter()
                .chain(&reference.greedy_ids)
                .copied()
                .collect();
            let mut kv = engine.model.new_sequence();
            let (mut stepped, mut most) = (Vec::new(), 0);
            for &token in &tokens {
                stepped.extend(engine.model.forward(&[token], kv.as_mut(), false)?.data);
                let usage = engine
                    .model
                    .kv_usage()
                    .context("the layout has no block pool")?;
                most = most.max(usage.blocks_in_use);
            }
            drop(kv);
            let (err, why) = compare(&stepped, &full_logits(&engine, &tokens)?.data, *max_abs_err);
            let held = (most > *max_blocks).then(|| {
                format!(
                    "{} tokens held {most} blocks at once, more than {max_blocks}",
                    tokens.len()
                )
            });
            Ok((err, why.or(held)))
        }
        Check::PrefixHitEqualsMiss {
            fixture,
            plugins,
            max_abs_err,
            configs,
        } => {
            let reference = Reference::load(&root.join(fixture))?;
            let engine = load_configured(fixture, plugins, configs)?;
            let prompt = &reference.prompt_ids;
            let mut first = engine.model.new_sequence();
            let miss = engine.model.forward(prompt, first.as_mut(), true)?;
            drop(first);
            let mut second = engine.model.new_sequence();
            let reused = second.reuse_prefix(prompt, None);
            if reused == 0 {
                return Ok((
                    None,
                    Some("the second sequence reused no cached block".into()),
                ));
            }
            let hit = engine
                .model
                .forward(&prompt[reused..], second.as_mut(), true)?;
            let cols = miss.cols;
            Ok(compare(
                &hit.data,
                &miss.data[reused * cols..],
                *max_abs_err,
            ))
        }
        Check::ReferenceDecodeLogits {
            fixture,
            plugins,
            max_abs_err,
            configs,
        } => {
            let reference = Reference::load(&root.join(fixture))?;
            let engine = load_configured(fixture, plugins, configs)?;
            let stepped = stepped_logits(&engine, &reference.prompt_ids)?;
            Ok(compare(
                &stepped,
                &reference.expected_logits(),
                *max_abs_err,
            ))
        }
        Check::SameLogits {
            fixture,
            a,
            b,
            max_abs_err,
            configs,
        } => {
            let reference = Reference::load(&root.join(fixture))?;
            // One forward over the prompt, then token by token: both ways through the cache.
            let logits = |plugins| -> anyhow::Result<Vec<f32>> {
                let engine = load_configured(fixture, plugins, configs)?;
                let mut all = full_logits(&engine, &reference.prompt_ids)?.data;
                all.extend(stepped_logits(&engine, &reference.prompt_ids)?);
                Ok(all)
            };
            Ok(compare(&logits(a)?, &logits(b)?, *max_abs_err))
        }
        Check::ParameterCount {
            config,
            plugins,
            total,
            active,
            rel_tol,
        } => {
            let mut app = App::new(Pipeline::Serving);
            for plugin in resolve(plugins, registry, catalog)? {
                app.add_plugin(plugin)?;
            }
            let counter = app
                .world
                .get_resource::<ParameterCounter>()
                .with_context(|| format!("none of {plugins:?} counts parameters"))?;
            let (counted_total, counted_active) = (counter.0)(&root.join(config))?;
            let off = |counted: u64, want: f64| (counted as f64 - want).abs() / want;
            let mut worst = off(counted_total, *total);
            let mut why = (worst > *rel_tol)
                .then(|| format!("counted {counted_total} parameters, reference {total}"));
            if let Some(want) = active {
                let err = off(counted_active, *want);
                worst = worst.max(err);
                if err > *rel_tol {
                    why = Some(format!(
                        "counted {counted_active} active parameters, reference {want}"
                    ));
                }
            }
            Ok((Some(worst as f32), why))
        }
        Check::ReferenceSampling {
            reference,
            plugins,
            draws,
            max_sigma,
        } => sampling(
            &root.join(reference),
            plugins,
            *draws,
            *max_sigma,
            registry,
            catalog,
        ),
        Check::ReferenceLogitsProcessing {
            plugin,
            reference,
            max_abs_err,
        } => logits_processing(
            &root.join(reference),
            plugin,
            *max_abs_err,
            registry,
            catalog,
        ),
        Check::ReferenceTextFilter {
            fixture,
            plugin,
            reference,
        } => text_filter(
            &root.join(fixture),
            plugin,
            &root.join(reference),
            registry,
            catalog,
        ),
        Check::MonitorLog { fixture, plugin } => {
            monitor_log(&root.join(fixture), plugin, registry, catalog)
        }
        Check::AdmissionSchedule {
            fixture,
            plugin,
            config,
            prompts,
            max_tokens,
            admitted_at,
        } => {
            let mut engine = with_plugin(&root.join(fixture), plugin, config, registry, catalog)?;
            let params = SamplingParams {
                max_tokens: *max_tokens,
                ignore_eos: true,
                ..SamplingParams::default()
            };
            let world = &mut engine.app.world;
            let requests: Vec<_> = prompts
                .iter()
                .map(|&n| {
                    let prompt = (1..=n as u32).collect();
                    world.spawn(request_bundle(prompt, params.clone())).id()
                })
                .collect();
            let mut started = vec![None; requests.len()];
            let limit = (prompts.len() * (max_tokens + 1) + 1) as u64;
            for step in 1..=limit {
                engine.app.step();
                for (request, started) in requests.iter().zip(&mut started) {
                    let state = engine.app.world.get::<SeqState>(*request);
                    if started.is_none() && state != Some(&SeqState::Waiting) {
                        *started = match state {
                            Some(SeqState::Failed(_)) => Some(None),
                            _ => Some(Some(step)),
                        };
                    }
                }
            }
            let got: Vec<Option<u64>> = started.into_iter().map(Option::flatten).collect();
            let why = (&got != admitted_at)
                .then(|| format!("admitted at steps {got:?}, expected {admitted_at:?}"));
            Ok((None, why))
        }
        Check::Schedule {
            fixture,
            plugins,
            configs,
            max_num_batched_tokens,
            max_num_seqs,
            requests,
            cached,
            preempted,
            fail,
        } => {
            let reference = Reference::load(&root.join(fixture))?;
            let mut engine = load_configured(fixture, plugins, configs)?;
            engine.app.world.insert_resource(StepBudget {
                max_num_batched_tokens: *max_num_batched_tokens,
                max_num_seqs: *max_num_seqs,
            });
            let why = schedule(&mut engine, &reference, requests, cached, *preempted, fail);
            Ok((None, why))
        }
        Check::ReferenceMetric {
            plugin,
            reference,
            max_abs_err,
        } => metric(&root.join(reference), plugin, *max_abs_err, catalog),
        Check::Rejects {
            fixture,
            plugins,
            mentions,
        } => match load(fixture, plugins) {
            Ok(_) => Ok((None, Some(format!("loading with {plugins:?} succeeded")))),
            Err(e) => {
                let message = format!("{e:#}");
                let why = (!message.contains(mentions.as_str()))
                    .then(|| format!("error does not mention `{mentions}`: {message}"));
                Ok((None, why))
            }
        },
    }
}

fn sampling(
    path: &Path,
    plugins: &[String],
    draws: usize,
    max_sigma: f32,
    registry: &Registry,
    catalog: &[Box<dyn Plugin>],
) -> anyhow::Result<Outcome> {
    let reference: SamplingReference = read_json(path)?;
    let tokens = Tokens {
        prompt: reference.history.clone(),
        generated: Vec::new(),
    };
    let mut worst = 0.0f32;
    for (index, case) in reference.cases.iter().enumerate() {
        let mut app = stage_app(plugins, &case.configs, registry, catalog)?;
        let mut counts = vec![0usize; reference.logits.len()];
        for seed in 0..draws as u64 {
            let params = SamplingParams {
                seed,
                ..case.params.clone()
            };
            let entity = run_sample(&mut app, tokens.clone(), params, &reference.logits);
            let chosen = app.world.get::<NextToken>(entity).and_then(|n| n.0);
            app.world.despawn(entity);
            let Some(token) = chosen.filter(|t| (*t as usize) < counts.len()) else {
                return Ok((
                    None,
                    Some(format!("case {index}: the sampler chose {chosen:?}")),
                ));
            };
            counts[token as usize] += 1;
        }
        let n = draws as f32;
        for (token, (&count, &prob)) in counts.iter().zip(&case.probs).enumerate() {
            if prob == 0.0 && count > 0 {
                return Ok((None, Some(format!("case {index}: token {token} is filtered by transformers but drawn {count} times"))));
            }
            let sigma = (prob * (1.0 - prob) / n).sqrt().max(1.0 / n);
            worst = worst.max((count as f32 / n - prob).abs() / sigma);
        }
    }
    let why = (worst > max_sigma)
        .then(|| format!("a token frequency is {worst:.1} standard deviations from transformers'"));
    Ok((Some(worst), why))
}

/// A pipeline without a model, for cases that run single stages on hand-made requests.
fn stage_app(
    plugins: &[String],
    configs: &BTreeMap<String, String>,
    registry: &Registry,
    catalog: &[Box<dyn Plugin>],
) -> anyhow::Result<App> {
    let mut app = App::new(Pipeline::Serving);
    crate::serving::external::install(&mut app);
    app.world.insert_resource(PluginConfigs(configs.clone()));
    for plugin in resolve(plugins, registry, catalog)? {
        app.add_plugin(plugin)?;
    }
    Ok(app)
}

/// Spawns a running request with these tokens and next-token logits, runs the Sample stage
/// over it and returns it (the caller reads its `Logits` and `NextToken`).
fn run_sample(app: &mut App, tokens: Tokens, params: SamplingParams, logits: &[f32]) -> Entity {
    let entity = app
        .world
        .spawn((
            tokens,
            params,
            SeqState::Running,
            Logits(logits.to_vec()),
            NextToken(None),
        ))
        .id();
    app.world.run_schedule(Stage::Sample);
    entity
}

/// Runs a [`Check::Schedule`] case on `engine`; why it failed, if it did.
fn schedule(
    engine: &mut Engine,
    reference: &Reference,
    requests: &[ScheduledRequest],
    cached: &[Vec<usize>],
    preempted: u64,
    fail: &[usize],
) -> Option<String> {
    let mut ids: Vec<Option<Entity>> = vec![None; requests.len()];
    let mut trace = Vec::new();
    for step in 1..=cached.len() as u64 {
        for (id, request) in ids.iter_mut().zip(requests) {
            if request.arrives == step {
                let params = SamplingParams {
                    temperature: 0.0,
                    max_tokens: request.max_tokens,
                    ignore_eos: true,
                    priority: request.priority,
                    ..SamplingParams::default()
                };
                let bundle = request_bundle(reference.prompt_ids.clone(), params);
                *id = Some(engine.app.world.spawn(bundle).id());
            }
        }
        engine.app.step();
        let world = &engine.app.world;
        let held = |id: &Option<Entity>| {
            id.and_then(|e| world.get::<Kv>(e))
                .map_or(0, |kv| kv.0.len(0))
        };
        trace.push(ids.iter().map(held).collect::<Vec<_>>());
    }
    if trace != cached {
        return Some(format!(
            "cached tokens after each step {trace:?}, expected {cached:?}"
        ));
    }
    let world = &engine.app.world;
    for (r, (id, request)) in ids.iter().zip(requests).enumerate() {
        let Some(id) = id else {
            return Some(format!("request {r} arrives after the last step"));
        };
        let state = world.get::<SeqState>(*id);
        let expected = &reference.greedy_ids[..request.max_tokens.min(reference.greedy_ids.len())];
        match (state, fail.contains(&r)) {
            (Some(SeqState::Failed(_)), true) => {}
            (Some(SeqState::Finished(_)), false) => {
                let tokens = &world.get::<Tokens>(*id).expect("a request").generated;
                if tokens != expected {
                    return Some(format!(
                        "request {r} generated {tokens:?}, transformers {expected:?}"
                    ));
                }
            }
            (state, _) => return Some(format!("request {r} ended the case as {state:?}")),
        }
    }
    let metrics = world.resource::<Metrics>();
    if metrics.preempted != preempted {
        return Some(format!(
            "{} preemptions, expected {preempted}",
            metrics.preempted
        ));
    }
    match engine.model.kv_usage() {
        Some(usage) if usage.blocks_in_use > 0 => Some(format!(
            "{} blocks are still in use after every request ended",
            usage.blocks_in_use
        )),
        _ => None,
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is malformed", path.display()))
}

/// The plugins of a case that exercises one plugin on a fixture model: what the model needs,
/// and the plugin configured with `config`.
fn with_plugin(
    fixture: &Path,
    plugin: &str,
    config: &str,
    registry: &Registry,
    catalog: &[Box<dyn Plugin>],
) -> anyhow::Result<Engine> {
    let configs = PluginConfigs([(plugin.to_string(), config.to_string())].into());
    Engine::load(
        fixture,
        &["auto".to_string(), plugin.to_string()],
        registry,
        catalog,
        &configs,
    )
}

#[derive(Deserialize)]
struct ProcessingCase {
    config: String,
    input_ids: Vec<u32>,
    scores: Vec<f32>,
    expected: Vec<Option<f32>>,
}

fn logits_processing(
    path: &Path,
    plugin: &str,
    tolerance: f32,
    registry: &Registry,
    catalog: &[Box<dyn Plugin>],
) -> anyhow::Result<Outcome> {
    #[derive(Deserialize)]
    struct File {
        cases: Vec<ProcessingCase>,
    }
    let file: File = read_json(path)?;
    let mut worst = 0.0f32;
    for (index, case) in file.cases.iter().enumerate() {
        let configs = [(plugin.to_string(), case.config.clone())].into();
        let mut app = stage_app(&[plugin.to_string()], &configs, registry, catalog)?;
        let tokens = Tokens {
            prompt: case.input_ids.clone(),
            generated: Vec::new(),
        };
        let entity = run_sample(&mut app, tokens, SamplingParams::default(), &case.scores);
        if let Some(SeqState::Failed(why)) = app.world.get::<SeqState>(entity) {
            bail!("case {index}: {why}");
        }
        let got = &app.world.get::<Logits>(entity).context("logits")?.0;
        let expected: Vec<f32> = case
            .expected
            .iter()
            .map(|v| v.unwrap_or(f32::NEG_INFINITY))
            .collect();
        match compare(got, &expected, tolerance) {
            (err, Some(why)) => {
                let why = format!("case {index} (config {:?}): {why}", case.config);
                return Ok((err, Some(why)));
            }
            (err, None) => worst = worst.max(err.unwrap_or(0.0)),
        }
    }
    Ok((Some(worst), None))
}

#[derive(Deserialize)]
struct FilterCase {
    config: String,
    text: String,
    released: String,
    flagged: bool,
    stopped: bool,
}

fn text_filter(
    fixture: &Path,
    plugin: &str,
    path: &Path,
    registry: &Registry,
    catalog: &[Box<dyn Plugin>],
) -> anyhow::Result<Outcome> {
    #[derive(Deserialize)]
    struct File {
        cases: Vec<FilterCase>,
    }
    let file: File = read_json(path)?;
    for (index, case) in file.cases.iter().enumerate() {
        let mut engine = with_plugin(fixture, plugin, &case.config, registry, catalog)?;
        let tokenizer = engine
            .tokenizer
            .clone()
            .with_context(|| format!("{} has no tokenizer.json", fixture.display()))?;
        let ids = tokenizer.encode(&case.text)?;
        let bos = engine.model.config.bos_token_id;
        let ids = match bos {
            Some(b) if ids.first() == Some(&b) => &ids[1..],
            _ => &ids[..],
        };
        let params = SamplingParams {
            max_tokens: ids.len(),
            ignore_eos: true,
            ..SamplingParams::default()
        };
        let world = &mut engine.app.world;
        let prompt = vec![bos.unwrap_or(0)];
        let entity = world.spawn(request_bundle(prompt, params)).id();
        world.entity_mut(entity).insert(SeqState::Running);
        // The tokens are forced rather than sampled; everything after Sample runs as in serving.
        for &token in ids {
            if world.get::<SeqState>(entity) != Some(&SeqState::Running) {
                break;
            }
            world.entity_mut(entity).insert(NextToken(Some(token)));
            for stage in [Stage::Filter, Stage::Emit, Stage::Monitor] {
                world.run_schedule(stage);
            }
        }
        let state = world.get::<SeqState>(entity).cloned();
        let text = world.get::<TextStream>(entity).context("text stream")?;
        let stopped = state == Some(SeqState::Finished(FinishReason::ContentFilter));
        let failure = if let Some(SeqState::Failed(why)) = &state {
            Some(why.clone())
        } else if text.released != case.released {
            Some(format!(
                "released {:?}, the reference {:?}",
                text.released, case.released
            ))
        } else if text.flags.is_empty() == case.flagged {
            Some(format!(
                "flagged: {:?}, the reference {}",
                text.flags, case.flagged
            ))
        } else if stopped != case.stopped {
            Some(format!(
                "stopped: {stopped}, the reference {}",
                case.stopped
            ))
        } else {
            None
        };
        if let Some(why) = failure {
            return Ok((None, Some(format!("case {index} ({:?}): {why}", case.text))));
        }
    }
    Ok((None, None))
}

fn metric(
    path: &Path,
    plugin: &str,
    tolerance: f64,
    catalog: &[Box<dyn Plugin>],
) -> anyhow::Result<Outcome> {
    #[derive(Deserialize)]
    struct MetricCase {
        config: String,
        prediction: String,
        reference: String,
        score: f64,
    }
    #[derive(Deserialize)]
    struct File {
        cases: Vec<MetricCase>,
    }
    let file: File = read_json(path)?;
    let external = find_external(catalog, plugin)
        .with_context(|| format!("no third-party plugin `{plugin}` is loaded"))?;
    let mut worst = 0.0f64;
    for (index, case) in file.cases.iter().enumerate() {
        let score = external
            .eval_metric(&case.config)?
            .score(&case.prediction, &case.reference)?;
        let err = (score - case.score).abs();
        if err.is_nan() || err > tolerance {
            let why = format!(
                "case {index} ({:?} vs {:?}): score {score}, the reference {}",
                case.prediction, case.reference, case.score
            );
            return Ok((Some(err as f32), Some(why)));
        }
        worst = worst.max(err);
    }
    Ok((Some(worst as f32), None))
}

fn monitor_log(
    fixture: &Path,
    plugin: &str,
    registry: &Registry,
    catalog: &[Box<dyn Plugin>],
) -> anyhow::Result<Outcome> {
    let reference = Reference::load(fixture)?;
    let log = std::env::temp_dir().join(format!(
        "vibee-monitor-{}-{:?}.jsonl",
        std::process::id(),
        std::time::SystemTime::now()
    ));
    let mut engine = with_plugin(
        fixture,
        plugin,
        &log.display().to_string(),
        registry,
        catalog,
    )?;
    let params = SamplingParams {
        temperature: 0.0,
        max_tokens: reference.greedy_ids.len(),
        ignore_eos: true,
        ..SamplingParams::default()
    };
    runner::generate(&mut engine.app, reference.prompt_ids.clone(), params)?;
    drop(engine);
    let text = std::fs::read_to_string(&log);
    let _ = std::fs::remove_file(&log);
    let text = text.with_context(|| format!("{plugin} wrote no log at {}", log.display()))?;
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{plugin} wrote a line that is not JSON"))?;
    let field = |e: &serde_json::Value, key: &str| e.get(key).cloned().unwrap_or_default();
    let summary: Vec<(String, u64)> = events
        .iter()
        .map(|e| {
            let kind = field(e, "event").as_str().unwrap_or_default().to_string();
            let value = match kind.as_str() {
                "token" => field(e, "token").as_u64(),
                _ => field(e, "count").as_u64(),
            };
            (kind, value.unwrap_or(u64::MAX))
        })
        .collect();
    let n = reference.greedy_ids.len() as u64;
    let mut expected = vec![("admitted".to_string(), reference.prompt_ids.len() as u64)];
    expected.extend(
        reference
            .greedy_ids
            .iter()
            .map(|&t| ("token".to_string(), t as u64)),
    );
    expected.push(("finished".to_string(), n));
    let finish = events.last().map(|e| field(e, "detail"));
    let why = if summary != expected {
        Some(format!("logged {summary:?}, expected {expected:?}"))
    } else if finish != Some(serde_json::json!("length")) {
        Some(format!("finish reason {finish:?}, expected \"length\""))
    } else {
        None
    };
    Ok((None, why))
}

fn full_logits(engine: &Engine, prompt: &[u32]) -> anyhow::Result<Matrix> {
    let mut kv = engine.model.new_sequence();
    engine.model.forward(prompt, kv.as_mut(), true)
}

/// The logits of each prompt position, feeding one token at a time through the cache.
fn stepped_logits(engine: &Engine, prompt: &[u32]) -> anyhow::Result<Vec<f32>> {
    let mut kv = engine.model.new_sequence();
    let mut stepped = Vec::new();
    for &token in prompt {
        stepped.extend(engine.model.forward(&[token], kv.as_mut(), false)?.data);
    }
    Ok(stepped)
}

/// The logits of [`Check::RollbackAndFork`]'s schedule, and of the same tokens run straight:
/// half the prompt, a draft of wrong tokens truncated away, the rest of the prompt; and a fork
/// after half the prompt that runs the rest while the original runs other tokens first.
fn rollback_and_fork(model: &Model, prompt: &[u32]) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let half = prompt.len() / 2;
    let (head, rest) = prompt.split_at(half);
    let draft: Vec<u32> = rest.iter().rev().copied().collect();
    let other: Vec<u32> = head.iter().chain(&draft).copied().collect();
    let straight = |tokens: &[u32]| -> anyhow::Result<Vec<f32>> {
        let mut kv = model.new_sequence();
        let all = model.forward(tokens, kv.as_mut(), true)?;
        Ok(all.rows_range(half..tokens.len()).data)
    };
    let mut expected = straight(prompt)?;
    expected.extend(straight(prompt)?);
    expected.extend(straight(&other)?);
    let mut got = Vec::new();
    let mut kv = model.new_sequence();
    model.forward(head, kv.as_mut(), false)?;
    model.forward(&draft, kv.as_mut(), false)?;
    kv.truncate(half);
    got.extend(model.forward(rest, kv.as_mut(), true)?.data);
    let mut parent = model.new_sequence();
    model.forward(head, parent.as_mut(), false)?;
    let mut child = parent.fork();
    // The original writes first, into the blocks the fork shares.
    let parent_logits = model.forward(&draft, parent.as_mut(), true)?;
    got.extend(model.forward(rest, child.as_mut(), true)?.data);
    got.extend(parent_logits.data);
    Ok((got, expected))
}

/// Every logit of the schedule [`Check::BatchEqualsSingle`] describes, from batched forwards
/// and from each sequence run alone.
fn batch_and_alone(model: &Model, prompt: &[u32]) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let n = prompt.len();
    let (short, late) = (&prompt[..n / 2], &prompt[n / 3..]);
    // Each step: per sequence, the tokens it feeds (none: it sits the step out).
    let next = [prompt[n - 1], prompt[0], prompt[1]];
    let steps: Vec<[&[u32]; 3]> = vec![
        [prompt, short, late],
        [&next[..1], &next[1..2], &next[2..]],
        [&next[1..2], &[], &prompt[..3]],
    ];
    let mut batched_kv: Vec<_> = (0..3).map(|_| model.new_sequence()).collect();
    let mut alone_kv: Vec<_> = (0..3).map(|_| model.new_sequence()).collect();
    let (mut batched, mut alone) = (Vec::new(), Vec::new());
    for step in &steps {
        let mut entries: Vec<BatchEntry<'_>> = batched_kv
            .iter_mut()
            .zip(step)
            .filter(|(_, tokens)| !tokens.is_empty())
            .map(|(kv, tokens)| BatchEntry {
                tokens,
                kv: kv.as_mut(),
                logits: Wanted::All,
            })
            .collect();
        for logits in model.forward_batch(&mut entries)? {
            batched.extend(logits.data);
        }
        for (kv, tokens) in alone_kv.iter_mut().zip(step) {
            if !tokens.is_empty() {
                alone.extend(model.forward(tokens, kv.as_mut(), true)?.data);
            }
        }
    }
    Ok((batched, alone))
}

fn compare(got: &[f32], expected: &[f32], tolerance: f32) -> Outcome {
    if got.len() != expected.len() {
        return (
            None,
            Some(format!(
                "{} values, reference has {}",
                got.len(),
                expected.len()
            )),
        );
    }
    let err = got
        .iter()
        .zip(expected)
        .map(|(a, b)| {
            if a == b {
                // Equal infinities (banned tokens) agree; their difference would be NaN.
                0.0
            } else if a.is_nan() || b.is_nan() {
                f32::INFINITY
            } else {
                (a - b).abs()
            }
        })
        .fold(0.0, f32::max);
    let why = (err > tolerance).then(|| format!("max abs error {err:.3e} > {tolerance:.0e}"));
    (Some(err), why)
}
