//! Third-party plugins: `cdylib`s built on vibee-sdk, loaded from disk (here) and adapted
//! into the serving pipeline's systems ([`adapters`]).

mod adapters;

use adapters::Extension;
pub use adapters::{install, Deferred, Extensions, PluginFaults};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Mutex, PoisonError};

use anyhow::{bail, Context};
use bevy_ecs::prelude::*;
use vibee_sdk::abi_stable::library::{lib_header_from_raw_library, LibraryError, RawLibrary};
use vibee_sdk::abi_stable::std_types::{RResult, RStr};
use vibee_sdk::{EvalMetricBox, Fault, Manifest, PluginModuleRef};

use crate::app::plugin::{Plugin, PluginSpec};
use crate::app::registry::{SpecEntry, Status, FAMILIES};
use crate::app::App;
use crate::serving::text::TokenizerResource;

/// Configuration strings for third-party plugins, by plugin name (`--plugin-config`).
#[derive(Resource, Debug, Default, Clone)]
pub struct PluginConfigs(pub BTreeMap<String, String>);

/// A plugin library loaded from disk.
pub struct ExternalPlugin {
    pub manifest: Manifest,
    /// The file it was loaded from.
    pub origin: PathBuf,
    id: &'static str,
    name: &'static str,
    module: PluginModuleRef,
}

/// The extension kinds a library can provide, as the host names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    LogitsProcessor,
    Sampler,
    TextFilter,
    Monitor,
    AdmissionPolicy,
    EvalMetric,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::LogitsProcessor => "logits processor",
            Kind::Sampler => "sampler",
            Kind::TextFilter => "text filter",
            Kind::Monitor => "monitor",
            Kind::AdmissionPolicy => "admission policy",
            Kind::EvalMetric => "eval metric",
        }
    }
}

/// The third-party plugin called `name` in a catalog.
pub fn find_external<'a>(catalog: &'a [Box<dyn Plugin>], name: &str) -> Option<&'a ExternalPlugin> {
    catalog
        .iter()
        .find(|p| p.spec().name == name)
        .and_then(|p| p.library()?.downcast_ref())
}

/// Loads every plugin library in `path` (a library file, or a directory of them).
pub fn load_path(path: &Path) -> anyhow::Result<Vec<ExternalPlugin>> {
    if !path.is_dir() {
        return Ok(vec![ExternalPlugin::load(path)?]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("cannot read the plugin directory {}", path.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(std::env::consts::DLL_SUFFIX))
        })
        .collect();
    files.sort();
    files.iter().map(|f| ExternalPlugin::load(f)).collect()
}

impl ExternalPlugin {
    /// Loads a fresh copy of the library at `path`, so a rebuilt library at the same path is
    /// a new library rather than the one the process already mapped. Its ABI is checked
    /// before anything in it runs.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes = crate::io::read_regular_file(path, crate::io::LARGE_FILE)
            .context("cannot read the plugin library")?;
        static COPIES: AtomicU64 = AtomicU64::new(0);
        let copies = std::env::temp_dir().join("vibee-plugins");
        std::fs::create_dir_all(&copies)
            .with_context(|| format!("cannot create {}", copies.display()))?;
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("plugin");
        let copy = copies.join(format!(
            "{stem}-{}-{}{}",
            std::process::id(),
            COPIES.fetch_add(1, AtomicOrdering::Relaxed),
            std::env::consts::DLL_SUFFIX
        ));
        std::fs::write(&copy, bytes).with_context(|| format!("cannot write {}", copy.display()))?;
        let loaded = Self::load_copy(&copy, path);
        // The mapping outlives the file; nothing needs the copy once it is loaded (or refused).
        let _ = std::fs::remove_file(&copy);
        loaded.with_context(|| format!("cannot load plugin {}", path.display()))
    }

    fn load_copy(copy: &Path, origin: &Path) -> anyhow::Result<Self> {
        let raw = RawLibrary::load_at(copy).map_err(describe)?;
        // SAFETY: the header refers into the library, which is never unloaded: abi_stable's
        // layout checker keeps references into every library it has checked, so unmapping
        // one would leave them dangling. A replaced library's instances are dropped; its code
        // stays mapped.
        let raw: &'static RawLibrary = Box::leak(Box::new(raw));
        let header = unsafe { lib_header_from_raw_library(raw) }.map_err(describe)?;
        let module = header
            .init_root_module::<PluginModuleRef>()
            .map_err(describe)?;
        let manifest = (module.manifest())();
        let (id, name) = check_manifest(&manifest)?;
        let plugin = Self {
            manifest,
            origin: origin.to_path_buf(),
            id,
            name,
            module,
        };
        plugin.kind()?;
        Ok(plugin)
    }

    /// The one extension the library provides.
    pub fn kind(&self) -> anyhow::Result<Kind> {
        let m = self.module;
        let offered: Vec<Kind> = [
            (
                m.new_logits_processor().flatten().is_some(),
                Kind::LogitsProcessor,
            ),
            (m.new_sampler().flatten().is_some(), Kind::Sampler),
            (m.new_text_filter().flatten().is_some(), Kind::TextFilter),
            (m.new_monitor().flatten().is_some(), Kind::Monitor),
            (
                m.new_admission_policy().flatten().is_some(),
                Kind::AdmissionPolicy,
            ),
            (m.new_eval_metric().flatten().is_some(), Kind::EvalMetric),
        ]
        .into_iter()
        .filter_map(|(has, kind)| has.then_some(kind))
        .collect();
        match offered[..] {
            [kind] => Ok(kind),
            [] => bail!(
                "plugin `{}` provides no extension this vibee knows",
                self.name
            ),
            _ => bail!("plugin `{}` provides more than one extension", self.name),
        }
    }

    /// The registry entry the plugin adds: its spec, with where it came from. A sampler fills
    /// the exclusive `sampler` slot, in place of vibee's.
    pub fn registry_entry(&self) -> SpecEntry {
        let m = &self.manifest;
        let kind = self.kind().ok();
        SpecEntry {
            id: self.id.into(),
            name: self.name.into(),
            family: m.family.to_string(),
            summary: m.summary.to_string(),
            status: Status::Implemented,
            requires: Vec::new(),
            conflicts: Vec::new(),
            provides: (kind == Some(Kind::Sampler)).then(|| "sampler".to_string()),
            default: false,
            conformance: None,
            origin: Some(format!(
                "{} {}, {}",
                self.origin.display(),
                m.version,
                kind.map_or("?", Kind::as_str)
            )),
        }
    }

    fn instantiate(&self, config: &str) -> anyhow::Result<Extension> {
        let m = self.module;
        let config = RStr::from_str(config);
        let made = match self.kind()? {
            Kind::LogitsProcessor => constructed(m.new_logits_processor().flatten(), config)
                .map(Extension::LogitsProcessor),
            Kind::Sampler => constructed(m.new_sampler().flatten(), config).map(Extension::Sampler),
            Kind::TextFilter => {
                constructed(m.new_text_filter().flatten(), config).map(Extension::TextFilter)
            }
            Kind::Monitor => constructed(m.new_monitor().flatten(), config).map(Extension::Monitor),
            Kind::AdmissionPolicy => constructed(m.new_admission_policy().flatten(), config)
                .map(Extension::AdmissionPolicy),
            Kind::EvalMetric => bail!(
                "`{}` is an eval metric: it scores outputs (`vibee score`), it does not run in \
                 the serving pipeline",
                self.name
            ),
        };
        made.map_err(|fault| anyhow::anyhow!("{}", fault_text(&fault)))
    }

    /// An instance of an eval-metric plugin, configured with `config`.
    pub fn eval_metric(&self, config: &str) -> anyhow::Result<EvalMetric> {
        let constructor = self
            .module
            .new_eval_metric()
            .flatten()
            .with_context(|| format!("`{}` is not an eval metric", self.name))?;
        let metric = constructed(Some(constructor), RStr::from_str(config))
            .map_err(|fault| anyhow::anyhow!("{}", fault_text(&fault)))?;
        Ok(EvalMetric {
            plugin: self.name,
            inner: metric,
        })
    }
}

/// A third-party eval metric, called directly rather than from a pipeline stage.
pub struct EvalMetric {
    plugin: &'static str,
    inner: EvalMetricBox,
}

impl EvalMetric {
    pub fn score(&mut self, prediction: &str, reference: &str) -> anyhow::Result<f64> {
        self.inner
            .score(RStr::from_str(prediction), RStr::from_str(reference))
            .into_result()
            .map_err(|fault| anyhow::anyhow!("metric `{}` {}", self.plugin, fault_text(&fault)))
    }
}

fn constructed<T>(
    constructor: Option<extern "C" fn(RStr<'_>) -> RResult<T, Fault>>,
    config: RStr<'_>,
) -> Result<T, Fault> {
    let constructor = constructor.expect("kind() found the constructor");
    constructor(config).into_result()
}

fn fault_text(fault: &Fault) -> String {
    if fault.panicked {
        format!("panicked: {}", fault.message)
    } else {
        fault.message.to_string()
    }
}

fn describe(e: LibraryError) -> anyhow::Error {
    match e {
        LibraryError::GetSymbolError { .. } => {
            anyhow::anyhow!("it is not a vibee plugin (it exports no vibee-sdk root module)")
        }
        LibraryError::AbiInstability(report) => {
            // The full report dumps both type layouts; its verdict is the last paragraph.
            let report = report.to_string();
            tracing::debug!("abi_stable's layout report:\n{report}");
            let verdict = report
                .rfind("\nError:")
                .map_or(report.as_str(), |i| &report[i + 1..]);
            anyhow::anyhow!(
                "its vibee-sdk types do not match this vibee's (vibee-sdk {}); rebuild it \
                 against this vibee-sdk ({})",
                env!("CARGO_PKG_VERSION"),
                verdict.split_whitespace().collect::<Vec<_>>().join(" ")
            )
        }
        other => anyhow::anyhow!("{other}"),
    }
}

/// Checks what a manifest claims and gives the plugin's id and name, interned: plugin names
/// live as long as the process (a reloaded library reuses its predecessor's).
fn check_manifest(m: &Manifest) -> anyhow::Result<(&'static str, &'static str)> {
    let name = m.name.as_str();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bail!("plugin name `{name}` must be lowercase letters, digits and dashes");
    }
    let Some((_, _, lo, hi)) = FAMILIES.iter().find(|(f, ..)| *f == m.family.as_str()) else {
        let names: Vec<_> = FAMILIES.iter().map(|(f, ..)| *f).collect();
        bail!(
            "plugin `{name}` names unknown family `{}`; families: {}",
            m.family,
            names.join(", ")
        );
    };
    let number: Option<u32> = m.spec.strip_prefix('v').and_then(|n| n.parse().ok());
    match number {
        Some(n) if (*lo..=*hi).contains(&n) => {}
        _ => bail!(
            "plugin `{name}` claims spec `{}`, which is not an id of family {} (v{lo}–v{hi})",
            m.spec,
            m.family
        ),
    }
    Ok((intern(m.spec.as_str()), intern(name)))
}

fn intern(s: &str) -> &'static str {
    static NAMES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut names = NAMES.lock().unwrap_or_else(PoisonError::into_inner);
    match names.get(s) {
        Some(interned) => interned,
        None => {
            let interned: &'static str = Box::leak(s.to_string().into_boxed_str());
            names.insert(interned);
            interned
        }
    }
}

impl Plugin for ExternalPlugin {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: self.id,
            name: self.name,
        }
    }

    fn library(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        let config = app
            .world
            .get_resource::<PluginConfigs>()
            .and_then(|c| c.0.get(self.name))
            .cloned()
            .unwrap_or_default();
        let extension = self.instantiate(&config)?;
        if matches!(extension, Extension::TextFilter(_))
            && !app.world.contains_resource::<TokenizerResource>()
        {
            bail!("a text filter needs the model's tokenizer.json, and this model has none");
        }
        app.world
            .get_resource_mut::<Extensions>()
            .context("third-party plugins run in the serving pipeline")?
            .attach(self.name, self.manifest.on_panic, extension);
        Ok(())
    }
}
