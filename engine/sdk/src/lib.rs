//! `vibee-sdk`: the one crate a third-party vibee plugin depends on.
//!
//! A plugin is a `cdylib` that implements one extension point — a [`LogitsProcessor`], a
//! [`Sampler`], a [`TextFilter`], a [`Monitor`], an [`AdmissionPolicy`] or an [`EvalMetric`]
//! — and exports it with [`export_plugin!`]. Everything that
//! crosses the library boundary is declared with abi_stable, so a plugin built with one rustc
//! loads into a vibee built with another, and a plugin whose types do not match the host's
//! layout is refused at load time with an error that names the mismatch.
//!
//! Panics never cross the boundary: the adapters here catch them inside the plugin and hand
//! the host a [`Fault`], which disables the plugin and, per its [`PanicPolicy`], fails the
//! request it was serving or lets it go on without the plugin. A plugin must be built with
//! `panic = "unwind"` (Cargo's default) for that to work.
//!
//! ```ignore
//! struct Shout;
//! impl vibee_sdk::TextFilter for Shout {
//!     fn on_text(&mut self, _seq: u64, text: &str, _finished: bool) -> Result<vibee_sdk::Verdict, String> {
//!         Ok(vibee_sdk::Verdict::pass(text.to_uppercase()))
//!     }
//! }
//! vibee_sdk::export_plugin! {
//!     name: "shout", spec: "v2405", family: "content-safety",
//!     summary: "Upper-cases every streamed character",
//!     on_panic: vibee_sdk::PanicPolicy::SkipPlugin,
//!     conformance: "",
//!     text_filter: |_config: &str| Ok(Shout),
//! }
//! ```

mod extensions;

pub use abi_stable;
use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{RResult, RStr, RString};
use abi_stable::{declare_root_module_statics, package_version_strings, StableAbi};
pub use extensions::*;

/// What a plugin says about itself; the host turns it into a registry entry.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct Manifest {
    /// The short name users pass to `--plugins`, e.g. `no-repeat-ngram`.
    pub name: RString,
    /// The spec it implements: an existing registry id, or a new id it proposes.
    pub spec: RString,
    /// The registry family of that spec, e.g. `serving` or `content-safety`.
    pub family: RString,
    pub summary: RString,
    /// The plugin's own version, shown by `vibee specs`.
    pub version: RString,
    pub on_panic: PanicPolicy,
    /// The plugin's conformance cases in the `specs/*.ron` format (empty: none).
    pub conformance: RString,
}

/// What happens to the request a plugin was serving when the plugin panics. Either way the
/// plugin is disabled and reported, and the engine goes on.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanicPolicy {
    /// The request gets an error: use where skipping the plugin would be unsafe (a filter).
    FailRequest,
    /// The request continues as if the plugin were not there (a monitor).
    SkipPlugin,
}

/// The root module a plugin library exports. A prefix type: fields added after
/// `manifest` in later SDK versions read as absent from older plugins instead of breaking them.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(option))]
pub struct PluginModule {
    #[sabi(last_prefix_field)]
    pub manifest: extern "C" fn() -> Manifest,
    pub new_logits_processor: Option<extern "C" fn(RStr<'_>) -> RResult<LogitsProcessorBox, Fault>>,
    pub new_text_filter: Option<extern "C" fn(RStr<'_>) -> RResult<TextFilterBox, Fault>>,
    pub new_monitor: Option<extern "C" fn(RStr<'_>) -> RResult<MonitorBox, Fault>>,
    pub new_sampler: Option<extern "C" fn(RStr<'_>) -> RResult<SamplerBox, Fault>>,
    pub new_admission_policy: Option<extern "C" fn(RStr<'_>) -> RResult<AdmissionPolicyBox, Fault>>,
    pub new_eval_metric: Option<extern "C" fn(RStr<'_>) -> RResult<EvalMetricBox, Fault>>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "vibee_plugin";
    const NAME: &'static str = "vibee_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// Exports a plugin: its manifest fields and the constructor of its one extension, a function
/// from the user's configuration string to the extension (or an error message).
#[macro_export]
macro_rules! export_plugin {
    (
        name: $name:expr,
        spec: $spec:expr,
        family: $family:expr,
        summary: $summary:expr,
        on_panic: $on_panic:expr,
        conformance: $conformance:expr,
        $kind:ident: $constructor:expr $(,)?
    ) => {
        extern "C" fn __vibee_manifest() -> $crate::Manifest {
            $crate::Manifest {
                name: $name.into(),
                spec: $spec.into(),
                family: $family.into(),
                summary: $summary.into(),
                version: env!("CARGO_PKG_VERSION").into(),
                on_panic: $on_panic,
                conformance: $conformance.into(),
            }
        }

        fn __vibee_module() -> $crate::PluginModuleRef {
            $crate::module_with!($kind, __vibee_manifest, $constructor)
        }

        // abi_stable looks the root module up under this mangled name; it is spelled out because
        // `#[no_mangle]` needs a literal identifier (a test checks it against abi_stable's).
        #[no_mangle]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::abi_stable::library::LibHeader = {
            extern "C" fn erased() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(__vibee_module)
            }
            unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::PluginModuleRef>(
                    erased,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

/// Builds the root module for one extension kind (used by [`export_plugin!`]): the
/// constructor of that kind is set, every other one is absent.
#[doc(hidden)]
#[macro_export]
macro_rules! module_with {
    ($kind:ident, $manifest:expr, $constructor:expr) => {{
        $crate::module_with!(@new $kind, $constructor);
        let mut module = $crate::Constructors::default();
        module.$kind = Some(new);
        $crate::module($manifest, module)
    }};
    (@new logits_processor, $c:expr) => { $crate::module_with!(@fn LogitsProcessorBox, logits_processor_box, $c); };
    (@new text_filter, $c:expr) => { $crate::module_with!(@fn TextFilterBox, text_filter_box, $c); };
    (@new monitor, $c:expr) => { $crate::module_with!(@fn MonitorBox, monitor_box, $c); };
    (@new sampler, $c:expr) => { $crate::module_with!(@fn SamplerBox, sampler_box, $c); };
    (@new admission_policy, $c:expr) => { $crate::module_with!(@fn AdmissionPolicyBox, admission_policy_box, $c); };
    (@new eval_metric, $c:expr) => { $crate::module_with!(@fn EvalMetricBox, eval_metric_box, $c); };
    (@fn $boxed:ident, $wrap:ident, $constructor:expr) => {
        extern "C" fn new(
            config: $crate::abi_stable::std_types::RStr<'_>,
        ) -> $crate::abi_stable::std_types::RResult<$crate::$boxed, $crate::Fault> {
            $crate::construct(config, $constructor, $crate::$wrap)
        }
    };
}

type Constructor<T> = Option<extern "C" fn(RStr<'_>) -> RResult<T, Fault>>;

/// One constructor per extension kind; a plugin sets one.
#[doc(hidden)]
#[derive(Default)]
pub struct Constructors {
    pub logits_processor: Constructor<LogitsProcessorBox>,
    pub text_filter: Constructor<TextFilterBox>,
    pub monitor: Constructor<MonitorBox>,
    pub sampler: Constructor<SamplerBox>,
    pub admission_policy: Constructor<AdmissionPolicyBox>,
    pub eval_metric: Constructor<EvalMetricBox>,
}

#[doc(hidden)]
pub fn module(manifest: extern "C" fn() -> Manifest, c: Constructors) -> PluginModuleRef {
    use abi_stable::prefix_type::PrefixTypeTrait;
    PluginModule {
        manifest,
        new_logits_processor: c.logits_processor,
        new_text_filter: c.text_filter,
        new_monitor: c.monitor,
        new_sampler: c.sampler,
        new_admission_policy: c.admission_policy,
        new_eval_metric: c.eval_metric,
    }
    .leak_into_prefix()
}

#[cfg(test)]
mod tests {
    #[test]
    fn export_plugin_uses_abi_stables_root_module_name() {
        assert_eq!(
            abi_stable::library::ROOT_MODULE_LOADER_NAME,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }
}
