//! Exports a root module named like vibee-sdk's, at vibee-sdk's version, whose `manifest`
//! returns a number instead of a `Manifest`: what a plugin built against an incompatible SDK
//! looks like. vibee must refuse it at load time, before calling into it.

use abi_stable::library::RootModule;
use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::{
    declare_root_module_statics, export_root_module, package_version_strings, StableAbi,
};

#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(option))]
pub struct PluginModule {
    #[sabi(last_prefix_field)]
    pub manifest: extern "C" fn() -> u64,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "vibee_plugin";
    const NAME: &'static str = "vibee_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

extern "C" fn manifest() -> u64 {
    7
}

#[export_root_module]
fn root() -> PluginModuleRef {
    PluginModule { manifest }.leak_into_prefix()
}
