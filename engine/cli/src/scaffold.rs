//! `vibee new-plugin`: a new third-party plugin crate that builds, loads and passes
//! `vibee conformance --plugin` as generated, for the author to change.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Kind {
    /// A logits processor (changes next-token scores before sampling).
    Logits,
    /// A text filter (sees streamed text; redacts, flags or stops).
    Filter,
    /// A monitor (receives request events).
    Monitor,
    /// A sampler (chooses the next token, in place of vibee's).
    Sampler,
    /// An admission policy (admits, defers or rejects waiting requests).
    Admission,
    /// An eval metric (scores a prediction against a reference).
    Metric,
}

/// Writes the crate `dir/name` and returns its path.
pub fn new_plugin(name: &str, kind: Kind, dir: &Path, sdk: &Path) -> anyhow::Result<PathBuf> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bail!("a plugin name is lowercase letters, digits and dashes, e.g. `my-filter`");
    }
    let sdk = sdk
        .canonicalize()
        .with_context(|| format!("cannot find vibee-sdk at {} (pass --sdk)", sdk.display()))?;
    if !sdk.join("Cargo.toml").is_file() {
        bail!("{} is not the vibee-sdk crate (pass --sdk)", sdk.display());
    }
    let root = dir.join(name);
    if root.exists() {
        bail!("{} already exists", root.display());
    }
    let (source, conformance, reference) = match kind {
        Kind::Logits => (LOGITS, LOGITS_CASES, Some(LOGITS_REFERENCE)),
        Kind::Filter => (FILTER, FILTER_CASES, Some(FILTER_REFERENCE)),
        Kind::Monitor => (MONITOR, MONITOR_CASES, None),
        Kind::Sampler => (SAMPLER, SAMPLER_CASES, Some(SAMPLER_REFERENCE)),
        Kind::Admission => (ADMISSION, ADMISSION_CASES, None),
        Kind::Metric => (METRIC, METRIC_CASES, Some(METRIC_REFERENCE)),
    };
    let fill = |text: &str| {
        text.replace("{name}", name)
            .replace("{crate}", &name.replace('-', "_"))
            .replace("{sdk}", &sdk.display().to_string())
            .replace("{dir}", &root.display().to_string())
    };
    std::fs::create_dir_all(root.join("src"))
        .with_context(|| format!("cannot create {}", root.display()))?;
    let mut files = vec![
        ("Cargo.toml", fill(CARGO)),
        ("src/lib.rs", fill(source)),
        ("conformance.ron", fill(conformance)),
    ];
    if let Some(reference) = reference {
        files.push(("reference.json", fill(reference)));
    }
    for (file, text) in files {
        std::fs::write(root.join(file), text)
            .with_context(|| format!("cannot write {}", root.join(file).display()))?;
    }
    Ok(root)
}

const CARGO: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"

[lib]
crate-type = ["cdylib"]

[dependencies]
vibee-sdk = { path = "{sdk}" }

# Panics are caught inside the plugin only when they unwind.
[profile.release]
panic = "unwind"
"#;

const LOGITS: &str = r#"//! {name}: a vibee logits processor. It bans the token id given as its configuration.

use vibee_sdk::{LogitsProcessor, PanicPolicy, Sequence};

struct Plugin {
    banned: usize,
}

impl LogitsProcessor for Plugin {
    fn process(&mut self, _seq: Sequence<'_>, logits: &mut [f32]) -> Result<(), String> {
        if let Some(logit) = logits.get_mut(self.banned) {
            *logit = f32::NEG_INFINITY;
        }
        Ok(())
    }
}

vibee_sdk::export_plugin! {
    name: "{name}",
    spec: "v2390",
    family: "serving",
    summary: "Bans one token id",
    on_panic: PanicPolicy::FailRequest,
    conformance: include_str!("../conformance.ron"),
    logits_processor: |config: &str| {
        let banned = config.trim().parse().map_err(|_| format!("`{config}` is not a token id"))?;
        Ok(Plugin { banned })
    },
}
"#;

const LOGITS_CASES: &str = r#"// Run with: vibee conformance --root {dir} --plugin target/release/lib{crate}.so
// Replace reference.json with outputs of an independent implementation.
(
    spec: "v2390",
    cases: [
        (name: "bans the configured token",
         check: ReferenceLogitsProcessing(plugin: "{name}", reference: "reference.json", max_abs_err: 0.0)),
    ],
)
"#;

const LOGITS_REFERENCE: &str = r#"{"cases": [
 {"config": "2", "input_ids": [1, 2, 3], "scores": [0.5, -1.0, 2.0, 0.25], "expected": [0.5, -1.0, null, 0.25]}
]}
"#;

const FILTER: &str = r#"//! {name}: a vibee text filter. It redacts every occurrence of the word its configuration
//! names, holding back text that could be the start of one.

use std::collections::HashMap;

use vibee_sdk::{PanicPolicy, TextFilter, Verdict};

struct Plugin {
    word: String,
    held: HashMap<u64, String>,
}

impl TextFilter for Plugin {
    fn on_text(&mut self, seq: u64, text: &str, finished: bool) -> Result<Verdict, String> {
        let mut buffer = self.held.remove(&seq).unwrap_or_default();
        buffer.push_str(text);
        let redacted = buffer.replace(&self.word, "[REDACTED]");
        // Keep back a tail that could still grow into the word.
        let keep = (1..self.word.len())
            .rev()
            .filter(|&n| self.word.is_char_boundary(n))
            .find(|&n| !finished && redacted.ends_with(&self.word[..n]))
            .unwrap_or(0);
        let cut = redacted.len() - keep;
        if keep > 0 {
            self.held.insert(seq, redacted[cut..].to_string());
        }
        Ok(Verdict::pass(&redacted[..cut]))
    }
}

vibee_sdk::export_plugin! {
    name: "{name}",
    spec: "v2410",
    family: "content-safety",
    summary: "Redacts one word",
    on_panic: PanicPolicy::FailRequest,
    conformance: include_str!("../conformance.ron"),
    text_filter: |config: &str| {
        let word = config.trim().to_string();
        if word.is_empty() {
            return Err("give the word to redact".to_string());
        }
        Ok(Plugin { word, held: HashMap::new() })
    },
}
"#;

const FILTER_CASES: &str = r#"// Run from the vibee repository (the case streams text through a fixture model's tokenizer):
// vibee conformance --plugin {dir}/target/release/lib{crate}.so --root .
// with the reference path below made absolute, or copy reference.json next to the fixtures.
(
    spec: "v2410",
    cases: [
        (name: "redacts the word across token boundaries",
         check: ReferenceTextFilter(fixture: "tests/fixtures/llama-gqa", plugin: "{name}",
                                    reference: "{dir}/reference.json")),
    ],
)
"#;

const FILTER_REFERENCE: &str = r#"{"cases": [
 {"config": "secret", "text": "the secret word is not secretive", "released": "the [REDACTED] word is not [REDACTED]ive", "flagged": false, "stopped": false}
]}
"#;

const MONITOR: &str = r##"//! {name}: a vibee monitor. It appends every request event to the JSON-lines file its
//! configuration names.

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};

use vibee_sdk::{Event, Monitor, PanicPolicy};

struct Plugin {
    out: LineWriter<File>,
}

impl Monitor for Plugin {
    fn on_event(&mut self, event: &Event<'_>) -> Result<(), String> {
        let kind = format!("{:?}", event.kind).to_lowercase();
        writeln!(
            self.out,
            r#"{{"event":"{kind}","seq":{},"step":{},"token":{},"count":{},"detail":{:?}}}"#,
            event.seq, event.step, event.token, event.count, event.detail.as_str()
        )
        .map_err(|e| e.to_string())
    }
}

vibee_sdk::export_plugin! {
    name: "{name}",
    spec: "v2650",
    family: "observability",
    summary: "Logs request events as JSON lines",
    on_panic: PanicPolicy::SkipPlugin,
    conformance: include_str!("../conformance.ron"),
    monitor: |config: &str| {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.trim())
            .map_err(|e| format!("cannot open `{config}`: {e}"))?;
        Ok(Plugin { out: LineWriter::new(file) })
    },
}
"##;

const MONITOR_CASES: &str = r#"// Run from the vibee repository (the case generates with a fixture model):
// vibee conformance --plugin {dir}/target/release/lib{crate}.so --root .
(
    spec: "v2650",
    cases: [
        (name: "logs admission, transformers' greedy tokens and the finish",
         check: MonitorLog(fixture: "tests/fixtures/llama-gqa", plugin: "{name}")),
    ],
)
"#;

const SAMPLER: &str = r#"//! {name}: a vibee sampler. It draws among the k most likely tokens (k from its
//! configuration) in proportion to their probabilities, or takes the most likely one when the
//! request asks for temperature 0.

use vibee_sdk::{PanicPolicy, Sampler, SamplingSettings, Sequence};

struct Plugin {
    k: usize,
}

impl Sampler for Plugin {
    fn sample(
        &mut self,
        seq: Sequence<'_>,
        logits: &[f32],
        settings: &SamplingSettings,
    ) -> Result<u32, String> {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if settings.temperature <= 0.0 {
            return Ok(order[0] as u32);
        }
        order.truncate(self.k.max(1));
        let top = logits[order[0]];
        let weights: Vec<f64> = order
            .iter()
            .map(|&t| (((logits[t] - top) / settings.temperature) as f64).exp())
            .collect();
        // A different, reproducible draw for every seed and step.
        let mut x = settings.seed ^ (seq.generated.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 33)).wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        x = (x ^ (x >> 33)).wrapping_mul(0xC4CE_B9FE_1A85_EC53);
        x ^= x >> 33;
        let mut draw = (x >> 11) as f64 / (1u64 << 53) as f64 * weights.iter().sum::<f64>();
        for (token, weight) in order.iter().zip(&weights) {
            if draw < *weight {
                return Ok(*token as u32);
            }
            draw -= weight;
        }
        Ok(order[order.len() - 1] as u32)
    }
}

vibee_sdk::export_plugin! {
    name: "{name}",
    spec: "v2391",
    family: "serving",
    summary: "Top-k sampling",
    on_panic: PanicPolicy::FailRequest,
    conformance: include_str!("../conformance.ron"),
    sampler: |config: &str| {
        let k = config.trim().parse().map_err(|_| format!("`{config}` is not a number of tokens"))?;
        Ok(Plugin { k })
    },
}
"#;

const SAMPLER_CASES: &str = r#"// Run with: vibee conformance --root {dir} --plugin target/release/lib{crate}.so
// Replace reference.json with distributions from an independent implementation.
(
    spec: "v2391",
    cases: [
        (name: "draws the two most likely tokens in proportion",
         check: ReferenceSampling(reference: "reference.json", plugins: ["{name}"], draws: 2000, max_sigma: 5.0)),
    ],
)
"#;

// softmax([ln 3, ln 1]) = [0.75, 0.25]; the other tokens are outside the top 2.
const SAMPLER_REFERENCE: &str = r#"{"logits": [1.0986123, 0.0, -1.0, -2.0], "history": [],
 "cases": [{"params": {"temperature": 1.0}, "configs": {"{name}": "2"}, "probs": [0.75, 0.25, 0.0, 0.0]}]}
"#;

const ADMISSION: &str = r#"//! {name}: a vibee admission policy. At most as many requests as its configuration says
//! run at once; the others wait, first come first served.

use vibee_sdk::{Admission, AdmissionPolicy, Candidate, Load, PanicPolicy};

struct Plugin {
    max_running: u64,
}

impl AdmissionPolicy for Plugin {
    fn admit(&mut self, _candidate: &Candidate, load: &Load) -> Result<Admission, String> {
        Ok(if load.running < self.max_running {
            Admission::admit()
        } else {
            Admission::defer()
        })
    }
}

vibee_sdk::export_plugin! {
    name: "{name}",
    spec: "v2321",
    family: "batching",
    summary: "At most N running requests",
    on_panic: PanicPolicy::FailRequest,
    conformance: include_str!("../conformance.ron"),
    admission_policy: |config: &str| {
        let max_running = config.trim().parse().map_err(|_| format!("`{config}` is not a number"))?;
        Ok(Plugin { max_running })
    },
}
"#;

const ADMISSION_CASES: &str = r#"// Run from the vibee repository (the case runs a fixture model):
// vibee conformance --plugin {dir}/target/release/lib{crate}.so --root .
(
    spec: "v2321",
    cases: [
        // One at a time, two tokens each: the second starts when the first has finished.
        (name: "one at a time",
         check: AdmissionSchedule(fixture: "tests/fixtures/llama-gqa", plugin: "{name}", config: "1",
                                  prompts: [3, 3], max_tokens: 2, admitted_at: [Some(1), Some(3)])),
    ],
)
"#;

const METRIC: &str = r#"//! {name}: a vibee eval metric. 100 when the prediction equals the reference after
//! trimming whitespace, 0 otherwise.

use vibee_sdk::{EvalMetric, PanicPolicy};

struct Plugin;

impl EvalMetric for Plugin {
    fn score(&mut self, prediction: &str, reference: &str) -> Result<f64, String> {
        Ok(if prediction.trim() == reference.trim() { 100.0 } else { 0.0 })
    }
}

vibee_sdk::export_plugin! {
    name: "{name}",
    spec: "v2501",
    family: "language",
    summary: "Exact match",
    on_panic: PanicPolicy::FailRequest,
    conformance: include_str!("../conformance.ron"),
    eval_metric: |_config: &str| Ok(Plugin),
}
"#;

const METRIC_CASES: &str = r#"// Run with: vibee conformance --root {dir} --plugin target/release/lib{crate}.so
// Replace reference.json with scores from an independent implementation.
(
    spec: "v2501",
    cases: [
        (name: "scores exact matches",
         check: ReferenceMetric(plugin: "{name}", reference: "reference.json", max_abs_err: 0.0)),
    ],
)
"#;

const METRIC_REFERENCE: &str = r#"{"cases": [
 {"config": "", "prediction": " Paris ", "reference": "Paris", "score": 100.0},
 {"config": "", "prediction": "Lyon", "reference": "Paris", "score": 0.0}
]}
"#;
