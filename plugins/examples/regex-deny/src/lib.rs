//! A third-party text filter built only on vibee-sdk: a regex deny-list over streamed text
//! that catches a pattern even when the tokens split it.
//!
//! Configuration, one rule per line (or `@FILE` to read them from a file):
//! ```text
//! redact \b\d{3}-\d{2}-\d{4}\b      # replaced by [REDACTED]
//! flag   (?i:password)             # streamed as is, the request is reported
//! stop   rm -rf /                   # the request ends before the match
//! hold 64                           # the longest text a match can span (default 64)
//! ```
//! The filter holds back the last `hold` characters of what it has seen, so a match is
//! decided only once no later text could change it; matching is leftmost-first over all the
//! rules, as Python's `re` does with an alternation.

use regex::Regex;
use vibee_sdk::{PanicPolicy, TextFilter, Verdict};

#[derive(Clone, Copy, PartialEq)]
enum Action {
    Redact,
    Flag,
    Stop,
}

struct RegexDeny {
    combined: Regex,
    actions: Vec<Action>,
    hold: usize,
    /// Per request: text seen but not released yet.
    held: std::collections::HashMap<u64, String>,
}

impl RegexDeny {
    fn new(config: &str) -> Result<Self, String> {
        let text = match config.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path.trim())
                .map_err(|e| format!("cannot read the deny list {}: {e}", path.trim()))?,
            None => config.to_string(),
        };
        let mut patterns = Vec::new();
        let mut actions = Vec::new();
        let mut hold = 64;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            let action = match word {
                "redact" => Action::Redact,
                "flag" => Action::Flag,
                "stop" => Action::Stop,
                "hold" => {
                    hold = rest.parse().map_err(|_| {
                        format!("line {}: `hold` takes a number of characters", number + 1)
                    })?;
                    continue;
                }
                other => {
                    return Err(format!(
                        "line {}: unknown action `{other}` (redact, flag, stop or hold)",
                        number + 1
                    ))
                }
            };
            Regex::new(rest).map_err(|e| format!("line {}: {e}", number + 1))?;
            patterns.push(format!("(?P<r{}>{rest})", patterns.len()));
            actions.push(action);
        }
        if patterns.is_empty() {
            return Err("regex-deny needs at least one redact, flag or stop rule".into());
        }
        let combined = Regex::new(&patterns.join("|")).map_err(|e| e.to_string())?;
        Ok(Self {
            combined,
            actions,
            hold,
            held: Default::default(),
        })
    }

    fn rule_of(&self, captures: &regex::Captures<'_>) -> Action {
        (0..self.actions.len())
            .find(|i| captures.name(&format!("r{i}")).is_some())
            .map_or(Action::Redact, |i| self.actions[i])
    }
}

impl TextFilter for RegexDeny {
    fn on_text(&mut self, seq: u64, text: &str, finished: bool) -> Result<Verdict, String> {
        let mut buffer = self.held.remove(&seq).unwrap_or_default();
        buffer.push_str(text);
        // Text from `safe` on may still be part of a match that later text completes.
        let safe = if finished {
            buffer.len()
        } else {
            buffer
                .char_indices()
                .rev()
                .nth(self.hold.saturating_sub(1))
                .map_or(0, |(i, _)| i)
        };
        let mut release = String::new();
        let mut flags = Vec::new();
        let mut done = 0;
        let mut cut = safe;
        for captures in self.combined.captures_iter(&buffer) {
            let m = captures.get(0).expect("group 0 is the whole match");
            if m.end() > safe || (m.start() >= safe && !finished) {
                cut = cut.min(m.start());
                break;
            }
            release.push_str(&buffer[done..m.start()]);
            match self.rule_of(&captures) {
                Action::Redact => release.push_str("[REDACTED]"),
                Action::Flag => {
                    release.push_str(m.as_str());
                    flags.push(m.as_str().to_string());
                }
                Action::Stop => {
                    return Ok(Verdict::stop(
                        release,
                        format!("`{}` is on the deny list", m.as_str()),
                    ))
                }
            }
            done = m.end();
        }
        let cut = cut.max(done);
        release.push_str(&buffer[done..cut]);
        if !finished {
            self.held.insert(seq, buffer[cut..].to_string());
        }
        Ok(match flags.is_empty() {
            true => Verdict::pass(release),
            false => Verdict::flag(release, format!("matched {}", flags.join(", "))),
        })
    }
}

vibee_sdk::export_plugin! {
    name: "regex-deny",
    spec: "v2400",
    family: "content-safety",
    summary: "Regex deny-list over streamed text: redact, flag or stop, across token boundaries",
    on_panic: PanicPolicy::FailRequest,
    conformance: include_str!("../conformance.ron"),
    text_filter: RegexDeny::new,
}
