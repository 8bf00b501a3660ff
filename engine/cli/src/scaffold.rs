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
