//! A third-party logits processor built only on vibee-sdk: no n-gram appears twice in a
//! sequence (prompt included), as transformers' `no_repeat_ngram_size` does. Configuration:
//! `n`, the n-gram size (e.g. `3`).

use vibee_sdk::{LogitsProcessor, PanicPolicy, Sequence};

struct NoRepeatNgram {
    n: usize,
}

impl NoRepeatNgram {
    fn new(config: &str) -> Result<Self, String> {
        match config.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(Self { n }),
            _ => Err(format!(
                "no-repeat-ngram's configuration is the n-gram size, a whole number ≥ 1; got `{config}`"
            )),
        }
    }
}

impl LogitsProcessor for NoRepeatNgram {
    fn process(&mut self, seq: Sequence<'_>, logits: &mut [f32]) -> Result<(), String> {
        let tokens: Vec<u32> = seq.tokens().collect();
        let n = self.n;
        if tokens.len() + 1 < n {
            return Ok(());
        }
        // Every earlier n-gram that begins with the last n-1 tokens bans its last token.
        let prefix = &tokens[tokens.len() + 1 - n..];
        for gram in tokens.windows(n) {
            if &gram[..n - 1] == prefix {
                if let Some(logit) = logits.get_mut(gram[n - 1] as usize) {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        Ok(())
    }
}

vibee_sdk::export_plugin! {
    name: "no-repeat-ngram",
    spec: "v2381",
    family: "serving",
    summary: "Bans any token that would repeat an n-gram already in the sequence (transformers' no_repeat_ngram_size)",
    on_panic: PanicPolicy::FailRequest,
    conformance: include_str!("../conformance.ron"),
    logits_processor: NoRepeatNgram::new,
}
