//! Forces the next token to the id given by `VIBEE_TEST_FORCED_TOKEN` when the library was
//! built (11 by default): rebuilding it with another value changes its behaviour, which is
//! what the hot-reload test watches for.

use vibee_sdk::{LogitsProcessor, PanicPolicy, Sequence};

struct Forced(usize);

impl LogitsProcessor for Forced {
    fn process(&mut self, _seq: Sequence<'_>, logits: &mut [f32]) -> Result<(), String> {
        for (token, logit) in logits.iter_mut().enumerate() {
            if token != self.0 {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }
}

fn forced_token() -> usize {
    option_env!("VIBEE_TEST_FORCED_TOKEN")
        .and_then(|t| t.parse().ok())
        .unwrap_or(11)
}

vibee_sdk::export_plugin! {
    name: "reloadable",
    spec: "v2398",
    family: "serving",
    summary: "Forces one token, chosen at build time (hot-reload test)",
    on_panic: PanicPolicy::FailRequest,
    conformance: "",
    logits_processor: |_config: &str| Ok(Forced(forced_token())),
}
