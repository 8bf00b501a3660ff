//! The extension points: the traits a plugin author implements, the ABI-stable trait objects
//! the host calls, and the adapters between them that keep panics inside the plugin.

// abi_stable's `#[sabi_trait]` expands to impls inside a generated constant.
#![allow(non_local_definitions)]

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::sabi_trait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RBox, RErr, ROk, RResult, RSlice, RSliceMut, RStr, RString};
use abi_stable::StableAbi;

/// Why a plugin call did not complete: an error the plugin returned, or a panic it raised.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Fault {
    pub panicked: bool,
    pub message: RString,
}

/// One request's tokens so far.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct Sequence<'a> {
    /// Stable for the request's lifetime, unique among live requests.
    pub id: u64,
    pub prompt: RSlice<'a, u32>,
    pub generated: RSlice<'a, u32>,
}

impl Sequence<'_> {
    /// Prompt then generated tokens.
    pub fn tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.prompt.iter().chain(self.generated.iter()).copied()
    }

    pub fn len(&self) -> usize {
        self.prompt.len() + self.generated.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Changes next-token logits before the sampler sees them (a token set to `-inf` is never
/// drawn). Runs in the Sample stage, once per running request per step.
pub trait LogitsProcessor: Send + 'static {
    fn process(&mut self, seq: Sequence<'_>, logits: &mut [f32]) -> Result<(), String>;
    /// The request `seq` is over: drop any state kept for it.
    fn finish(&mut self, _seq: u64) -> Result<(), String> {
        Ok(())
    }
}

/// What a text filter lets through and what it decides.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Text to stream to the client now (possibly redacted). Text not released yet is held
    /// by the filter, so a pattern split across tokens can still be caught.
    pub release: RString,
    pub action: FilterAction,
    /// Why, for `Flag` and `Stop`.
    pub reason: RString,
}

#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterAction {
    Continue,
    /// Keep streaming, but report the request.
    Flag,
    /// End the request after `release` (finish reason `content_filter`).
    Stop,
}

impl Verdict {
    pub fn pass(release: impl Into<String>) -> Self {
        Self::with(release, FilterAction::Continue, "")
    }

    pub fn flag(release: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::with(release, FilterAction::Flag, reason)
    }

    pub fn stop(release: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::with(release, FilterAction::Stop, reason)
    }

    fn with(release: impl Into<String>, action: FilterAction, reason: impl Into<String>) -> Self {
        Self {
            release: RString::from(release.into()),
            action,
            reason: RString::from(reason.into()),
        }
    }
}

/// Sees each request's generated text as it streams (the Filter stage).
pub trait TextFilter: Send + 'static {
    /// `text` is what the request's text grew by since the last call; with `finished` no more
    /// will come, so everything held back must be released (or dropped) now.
    fn on_text(&mut self, seq: u64, text: &str, finished: bool) -> Result<Verdict, String>;
}

#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A request started running; `count` is its prompt length.
    Admitted,
    /// A token was generated; `token` is it, `count` how many the request has generated.
    Token,
    /// A request finished; `detail` is the finish reason, `count` its generated tokens.
    Finished,
    /// A request failed; `detail` says why.
    Failed,
    /// A text filter flagged a request; `detail` says why.
    Flagged,
}

/// Something that happened to a request during engine step `step`.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct Event<'a> {
    pub kind: EventKind,
    pub seq: u64,
    pub step: u64,
    pub token: u32,
    pub count: u64,
    pub detail: RStr<'a>,
}

/// Receives the engine's request events (the Monitor stage): a metric sink, a logger.
pub trait Monitor: Send + 'static {
    fn on_event(&mut self, event: &Event<'_>) -> Result<(), String>;
}

/// The request's sampling settings, as the client gave them.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq)]
pub struct SamplingSettings {
    /// 0 asks for the most likely token.
    pub temperature: f32,
    /// 0: off.
    pub top_k: u64,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    /// 1: off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

/// Chooses the next token from the logits, in place of vibee's sampler (it fills the
/// exclusive `sampler` slot). Runs in the Sample stage after the logits processors.
pub trait Sampler: Send + 'static {
    fn sample(
        &mut self,
        seq: Sequence<'_>,
        logits: &[f32],
        settings: &SamplingSettings,
    ) -> Result<u32, String>;
}

/// A request waiting to run.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct Candidate {
    pub seq: u64,
    pub prompt_tokens: u64,
    pub max_tokens: u64,
    /// Milliseconds since the request was submitted.
    pub waited_ms: u64,
}

/// The engine's load when a candidate is considered (requests admitted earlier in the same
/// step count as running).
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct Load {
    pub running: u64,
    /// Prompt plus generated tokens held by running requests.
    pub running_tokens: u64,
    pub waiting: u64,
}

#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Admit,
    /// Ask again at the next step.
    Defer,
    /// Fail the request with the admission's reason.
    Reject,
}

#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Admission {
    pub decision: Decision,
    pub reason: RString,
}

impl Admission {
    pub fn admit() -> Self {
        Self::with(Decision::Admit, "")
    }

    pub fn defer() -> Self {
        Self::with(Decision::Defer, "")
    }

    pub fn reject(reason: impl Into<String>) -> Self {
        Self::with(Decision::Reject, reason)
    }

    fn with(decision: Decision, reason: impl Into<String>) -> Self {
        Self {
            decision,
            reason: RString::from(reason.into()),
        }
    }
}

/// Decides, in the Admit stage, which waiting requests start running, in submission order.
pub trait AdmissionPolicy: Send + 'static {
    fn admit(&mut self, candidate: &Candidate, load: &Load) -> Result<Admission, String>;
}

/// Scores a model's output against a reference (higher is better).
pub trait EvalMetric: Send + 'static {
    fn score(&mut self, prediction: &str, reference: &str) -> Result<f64, String>;
}

/// The ABI-stable form of [`LogitsProcessor`] that the host calls.
#[sabi_trait]
pub trait LogitsProcessorFfi: Send {
    fn process(&mut self, seq: Sequence<'_>, logits: RSliceMut<'_, f32>) -> RResult<(), Fault>;
    #[sabi(last_prefix_field)]
    fn finish(&mut self, seq: u64) -> RResult<(), Fault>;
}

/// The ABI-stable form of [`TextFilter`] that the host calls.
#[sabi_trait]
pub trait TextFilterFfi: Send {
    #[sabi(last_prefix_field)]
    fn on_text(&mut self, seq: u64, text: RStr<'_>, finished: bool) -> RResult<Verdict, Fault>;
}

/// The ABI-stable form of [`Monitor`] that the host calls.
#[sabi_trait]
pub trait MonitorFfi: Send {
    #[sabi(last_prefix_field)]
    fn on_event(&mut self, event: Event<'_>) -> RResult<(), Fault>;
}

/// The ABI-stable form of [`Sampler`] that the host calls.
#[sabi_trait]
pub trait SamplerFfi: Send {
    #[sabi(last_prefix_field)]
    fn sample(
        &mut self,
        seq: Sequence<'_>,
        logits: RSlice<'_, f32>,
        settings: SamplingSettings,
    ) -> RResult<u32, Fault>;
}

/// The ABI-stable form of [`AdmissionPolicy`] that the host calls.
#[sabi_trait]
pub trait AdmissionPolicyFfi: Send {
    #[sabi(last_prefix_field)]
    fn admit(&mut self, candidate: Candidate, load: Load) -> RResult<Admission, Fault>;
}

/// The ABI-stable form of [`EvalMetric`] that the host calls.
#[sabi_trait]
pub trait EvalMetricFfi: Send {
    #[sabi(last_prefix_field)]
    fn score(&mut self, prediction: RStr<'_>, reference: RStr<'_>) -> RResult<f64, Fault>;
}

pub type LogitsProcessorBox = LogitsProcessorFfi_TO<'static, RBox<()>>;
pub type SamplerBox = SamplerFfi_TO<'static, RBox<()>>;
pub type AdmissionPolicyBox = AdmissionPolicyFfi_TO<'static, RBox<()>>;
pub type EvalMetricBox = EvalMetricFfi_TO<'static, RBox<()>>;
pub type TextFilterBox = TextFilterFfi_TO<'static, RBox<()>>;
pub type MonitorBox = MonitorFfi_TO<'static, RBox<()>>;

/// An author's extension behind the ABI-stable trait, with every call guarded.
struct Guarded<T>(T);

impl<T: LogitsProcessor> LogitsProcessorFfi for Guarded<T> {
    fn process(&mut self, seq: Sequence<'_>, mut logits: RSliceMut<'_, f32>) -> RResult<(), Fault> {
        guard(|| self.0.process(seq, logits.as_mut_slice()))
    }

    fn finish(&mut self, seq: u64) -> RResult<(), Fault> {
        guard(|| self.0.finish(seq))
    }
}

impl<T: TextFilter> TextFilterFfi for Guarded<T> {
    fn on_text(&mut self, seq: u64, text: RStr<'_>, finished: bool) -> RResult<Verdict, Fault> {
        guard(|| self.0.on_text(seq, text.as_str(), finished))
    }
}

impl<T: Monitor> MonitorFfi for Guarded<T> {
    fn on_event(&mut self, event: Event<'_>) -> RResult<(), Fault> {
        guard(|| self.0.on_event(&event))
    }
}

impl<T: Sampler> SamplerFfi for Guarded<T> {
    fn sample(
        &mut self,
        seq: Sequence<'_>,
        logits: RSlice<'_, f32>,
        settings: SamplingSettings,
    ) -> RResult<u32, Fault> {
        guard(|| self.0.sample(seq, logits.as_slice(), &settings))
    }
}

impl<T: AdmissionPolicy> AdmissionPolicyFfi for Guarded<T> {
    fn admit(&mut self, candidate: Candidate, load: Load) -> RResult<Admission, Fault> {
        guard(|| self.0.admit(&candidate, &load))
    }
}

impl<T: EvalMetric> EvalMetricFfi for Guarded<T> {
    fn score(&mut self, prediction: RStr<'_>, reference: RStr<'_>) -> RResult<f64, Fault> {
        guard(|| self.0.score(prediction.as_str(), reference.as_str()))
    }
}

#[doc(hidden)]
pub fn sampler_box<T: Sampler>(inner: T) -> SamplerBox {
    SamplerBox::from_value(Guarded(inner), TD_Opaque)
}

#[doc(hidden)]
pub fn admission_policy_box<T: AdmissionPolicy>(inner: T) -> AdmissionPolicyBox {
    AdmissionPolicyBox::from_value(Guarded(inner), TD_Opaque)
}

#[doc(hidden)]
pub fn eval_metric_box<T: EvalMetric>(inner: T) -> EvalMetricBox {
    EvalMetricBox::from_value(Guarded(inner), TD_Opaque)
}

#[doc(hidden)]
pub fn logits_processor_box<T: LogitsProcessor>(inner: T) -> LogitsProcessorBox {
    LogitsProcessorBox::from_value(Guarded(inner), TD_Opaque)
}

#[doc(hidden)]
pub fn text_filter_box<T: TextFilter>(inner: T) -> TextFilterBox {
    TextFilterBox::from_value(Guarded(inner), TD_Opaque)
}

#[doc(hidden)]
pub fn monitor_box<T: Monitor>(inner: T) -> MonitorBox {
    MonitorBox::from_value(Guarded(inner), TD_Opaque)
}

/// Runs a plugin's constructor on the user's configuration, guarded like every other call.
#[doc(hidden)]
pub fn construct<T, B>(
    config: RStr<'_>,
    constructor: impl FnOnce(&str) -> Result<T, String>,
    wrap: fn(T) -> B,
) -> RResult<B, Fault> {
    guard(|| constructor(config.as_str()).map(wrap))
}

/// Calls into the author's code, turning a returned error or a panic into a [`Fault`] so that
/// no unwind ever crosses the `extern "C"` boundary.
fn guard<T>(call: impl FnOnce() -> Result<T, String>) -> RResult<T, Fault> {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(value)) => ROk(value),
        Ok(Err(message)) => RErr(Fault {
            panicked: false,
            message: message.into(),
        }),
        Err(payload) => RErr(Fault {
            panicked: true,
            message: panic_message(payload.as_ref()).into(),
        }),
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Boom;

    impl Monitor for Boom {
        fn on_event(&mut self, event: &Event<'_>) -> Result<(), String> {
            match event.kind {
                EventKind::Failed => Err("refused".into()),
                _ => panic!("monitor exploded at step {}", event.step),
            }
        }
    }

    fn event(kind: EventKind) -> Event<'static> {
        Event {
            kind,
            seq: 1,
            step: 7,
            token: 0,
            count: 0,
            detail: RStr::from(""),
        }
    }

    #[test]
    fn panics_and_errors_come_back_as_faults() {
        let mut monitor = monitor_box(Boom);
        assert_eq!(
            monitor.on_event(event(EventKind::Token)),
            RErr(Fault {
                panicked: true,
                message: "monitor exploded at step 7".into()
            })
        );
        assert_eq!(
            monitor.on_event(event(EventKind::Failed)),
            RErr(Fault {
                panicked: false,
                message: "refused".into()
            })
        );
    }
}
