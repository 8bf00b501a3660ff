//! A logits processor that panics once a request has generated as many tokens as its
//! configuration says (default 2): vibee must fail that request, disable the plugin and go on.

use vibee_sdk::{LogitsProcessor, PanicPolicy, Sequence};

struct Panicking {
    after: usize,
}

impl LogitsProcessor for Panicking {
    fn process(&mut self, seq: Sequence<'_>, _logits: &mut [f32]) -> Result<(), String> {
        if seq.generated.len() >= self.after {
            panic!("deliberate panic after {} tokens", self.after);
        }
        Ok(())
    }
}

vibee_sdk::export_plugin! {
    name: "panicking",
    spec: "v2399",
    family: "serving",
    summary: "Panics on purpose (isolation tests)",
    on_panic: PanicPolicy::FailRequest,
    conformance: "",
    logits_processor: |config: &str| Ok(Panicking {
        after: config.trim().parse().unwrap_or(2),
    }),
}
