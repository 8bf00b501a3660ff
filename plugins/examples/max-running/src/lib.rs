//! A third-party admission policy built only on vibee-sdk: at most `max_running` requests run
//! at once (the rest wait, first come first served), and prompts longer than
//! `max_prompt_tokens` are rejected. Configuration, one setting per line:
//! ```text
//! max_running 2
//! max_prompt_tokens 512
//! ```

use vibee_sdk::{Admission, AdmissionPolicy, Candidate, Load, PanicPolicy};

struct MaxRunning {
    max_running: u64,
    max_prompt_tokens: u64,
}

impl MaxRunning {
    fn new(config: &str) -> Result<Self, String> {
        let mut policy = Self {
            max_running: u64::MAX,
            max_prompt_tokens: u64::MAX,
        };
        for line in config.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let value: u64 = value
                .trim()
                .parse()
                .map_err(|_| format!("`{line}`: the value must be a whole number"))?;
            match key {
                "max_running" if value > 0 => policy.max_running = value,
                "max_prompt_tokens" => policy.max_prompt_tokens = value,
                _ => {
                    return Err(format!(
                        "`{line}`: settings are max_running (≥ 1) and max_prompt_tokens"
                    ))
                }
            }
        }
        Ok(policy)
    }
}

impl AdmissionPolicy for MaxRunning {
    fn admit(&mut self, candidate: &Candidate, load: &Load) -> Result<Admission, String> {
        Ok(if candidate.prompt_tokens > self.max_prompt_tokens {
            Admission::reject(format!(
                "the prompt has {} tokens; this server accepts at most {}",
                candidate.prompt_tokens, self.max_prompt_tokens
            ))
        } else if load.running >= self.max_running {
            Admission::defer()
        } else {
            Admission::admit()
        })
    }
}

vibee_sdk::export_plugin! {
    name: "max-running",
    spec: "v2320",
    family: "batching",
    summary: "Admission policy: at most N running requests (first come, first served) and a prompt-length limit",
    on_panic: PanicPolicy::FailRequest,
    conformance: include_str!("../conformance.ron"),
    admission_policy: MaxRunning::new,
}
