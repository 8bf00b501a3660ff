//! Hot reload, applied at step boundaries so no request sees half a change.
//!
//! - A third-party library that is rebuilt in place is loaded as a fresh copy and its
//!   extension replaces the old one's instance; a copy that fails to load or fails the ABI
//!   check leaves the running version in place.
//! - A pipeline file lists the pipeline-level plugins to run (and their configurations);
//!   editing it enables and disables plugins, and so do admin commands sent through an
//!   [`AdminHandle`] (what a server's admin endpoint calls). Plugins that are part of the
//!   model (those that registered operators) need a restart and are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bevy_ecs::prelude::Resource;
use notify::{RecursiveMode, Watcher};
use serde::Deserialize;

use crate::app::plugin::{resolve, Plugin};
use crate::app::registry::Registry;
use crate::app::App;
use crate::model::ops::Operators;
use crate::serving::external::{ExternalPlugin, PluginConfigs};

/// What the pipeline file says.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Pipeline-level plugins to run, by name, besides the model's own.
    pub plugins: Vec<String>,
    /// Configurations of third-party plugins, by name.
    #[serde(default)]
    pub configs: BTreeMap<String, String>,
}

impl PipelineFile {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = crate::io::read_regular_text(path, crate::io::SMALL_FILE)?;
        ron::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}:{}:{}: {}",
                path.display(),
                e.position.line,
                e.position.col,
                e.code
            )
        })
    }
}

/// An admin command, applied at the next step boundary.
#[derive(Debug, Clone, PartialEq)]
pub enum Admin {
    /// Enable a plugin (with a configuration, for a third-party one), or reconfigure it.
    Enable {
        plugin: String,
        config: Option<String>,
    },
    Disable {
        plugin: String,
    },
}

/// Sends admin commands to a running engine from any thread.
#[derive(Clone)]
pub struct AdminHandle(Sender<Admin>);

impl AdminHandle {
    pub fn send(&self, command: Admin) -> anyhow::Result<()> {
        self.0
            .send(command)
            .map_err(|_| anyhow::anyhow!("the engine has stopped"))
    }
}

/// Every reload the engine applied or refused, in order: what `vibee` logs, and what tests read.
#[derive(Resource, Debug, Default, Clone)]
pub struct ReloadLog(pub Vec<String>);

/// What a [`Reloader`] watches.
#[derive(Debug, Default, Clone)]
pub struct Watch {
    /// Loaded third-party libraries, with their plugins' names: reloaded when rebuilt.
    pub libraries: BTreeMap<PathBuf, &'static str>,
    /// Plugin directories: a library that appears in one is loaded, ready to be enabled.
    pub directories: Vec<PathBuf>,
    /// The pipeline file.
    pub pipeline: Option<PathBuf>,
}

/// Watches plugin libraries, plugin directories and a pipeline file; [`Reloader::install`]
/// makes every engine step apply what changed first.
pub struct Reloader {
    _watcher: notify::RecommendedWatcher,
    changes: Receiver<PathBuf>,
    admin: (Sender<Admin>, Receiver<Admin>),
    /// Changed files not applied yet: a file still being written is left for a later step.
    pending: BTreeSet<PathBuf>,
    /// Each file's modification time and length when it was last read, so that a file whose
    /// events outnumber its changes is read once per change.
    seen: BTreeMap<PathBuf, (SystemTime, u64)>,
    /// The library each third-party plugin was loaded from, by plugin name.
    libraries: BTreeMap<PathBuf, &'static str>,
    directories: BTreeSet<PathBuf>,
    pipeline: Option<PathBuf>,
    registry: Registry,
    catalog: Vec<Box<dyn Plugin>>,
}

/// How long a changed file must stay unchanged before it is read: the writer has finished.
const SETTLE: Duration = Duration::from_millis(150);

impl Reloader {
    /// Watches what `watch` names; `registry` and `catalog` are the engine's, with the
    /// third-party plugins already loaded.
    pub fn new(
        registry: Registry,
        catalog: Vec<Box<dyn Plugin>>,
        watch: Watch,
    ) -> anyhow::Result<Self> {
        let (tx, changes) = channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
                // Writes, renames and new files; not reads (loading a library opens it).
                let Ok(event) = event else { return };
                if matches!(
                    event.kind,
                    EventKind::Create(_)
                        | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_))
                        | EventKind::Modify(ModifyKind::Any)
                        | EventKind::Access(AccessKind::Close(AccessMode::Write))
                ) {
                    for path in event.paths {
                        let _ = tx.send(path);
                    }
                }
            })
            .context("cannot start watching files")?;
        let libraries: BTreeMap<PathBuf, &'static str> = watch
            .libraries
            .into_iter()
            .map(|(path, name)| (absolute(&path), name))
            .collect();
        let directories: BTreeSet<PathBuf> =
            watch.directories.iter().map(|d| absolute(d)).collect();
        let pipeline = watch.pipeline.map(|p| absolute(&p));
        // Directories are watched, not files: a rebuild replaces the file under its name.
        let dirs: BTreeSet<PathBuf> = libraries
            .keys()
            .chain(&pipeline)
            .filter_map(|p| p.parent().map(Path::to_path_buf))
            .chain(directories.iter().cloned())
            .collect();
        for dir in dirs {
            watcher
                .watch(&dir, RecursiveMode::NonRecursive)
                .with_context(|| format!("cannot watch {}", dir.display()))?;
        }
        Ok(Self {
            _watcher: watcher,
            changes,
            admin: channel(),
            pending: BTreeSet::new(),
            seen: BTreeMap::new(),
            libraries,
            directories,
            pipeline,
            registry,
            catalog,
        })
    }

    /// A handle for admin commands; they apply at the step boundary after they arrive.
    pub fn admin(&self) -> AdminHandle {
        AdminHandle(self.admin.0.clone())
    }

    /// Makes `app` apply changes before each step.
    pub fn install(mut self, app: &mut App) {
        app.world.init_resource::<ReloadLog>();
        app.on_step_boundary(Box::new(move |app| self.apply(app)));
    }

    fn apply(&mut self, app: &mut App) {
        let changed: Vec<PathBuf> = self
            .changes
            .try_iter()
            .map(|p| absolute(&p))
            .filter(|p| {
                self.libraries.contains_key(p)
                    || self.pipeline.as_ref() == Some(p)
                    || self.is_new_library(p)
            })
            .collect();
        self.pending.extend(changed);
        let settled: Vec<(PathBuf, (SystemTime, u64))> = self
            .pending
            .iter()
            .filter_map(|p| stamp(p).filter(|s| settled(s.0)).map(|s| (p.clone(), s)))
            .collect();
        let mut outcomes = Vec::new();
        for (path, stamp) in settled {
            self.pending.remove(&path);
            if self.seen.insert(path.clone(), stamp) == Some(stamp) {
                continue;
            }
            if let Some(&name) = self.libraries.get(&path) {
                outcomes.push(self.reload_library(app, &path, name));
            } else if self.is_new_library(&path) {
                outcomes.push(self.add_library(&path));
            } else {
                let source = path.display().to_string();
                let file = PipelineFile::read(&path).context("kept the running pipeline");
                outcomes.push(file.and_then(|file| self.apply_pipeline(app, file, &source)));
            }
        }
        let commands: Vec<Admin> = self.admin.1.try_iter().collect();
        for command in commands {
            let mut file = current_pipeline(app);
            match &command {
                Admin::Enable { plugin, config } => {
                    file.plugins.push(plugin.clone());
                    if let Some(config) = config {
                        file.configs.insert(plugin.clone(), config.clone());
                    }
                }
                Admin::Disable { plugin } => {
                    file.plugins.retain(|p| p != plugin);
                    file.configs.remove(plugin);
                }
            }
            outcomes.push(self.apply_pipeline(app, file, &format!("admin {command:?}")));
        }
        for outcome in outcomes {
            let line = match outcome {
                Ok(done) => {
                    tracing::info!("{done}");
                    done
                }
                Err(e) => {
                    tracing::warn!("{e:#}");
                    format!("{e:#}")
                }
            };
            app.world.resource_mut::<ReloadLog>().0.push(line);
        }
    }

    /// A library file in a plugin directory that no loaded plugin came from.
    fn is_new_library(&self, path: &Path) -> bool {
        let in_directory = path
            .parent()
            .is_some_and(|dir| self.directories.contains(dir));
        let is_library = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(std::env::consts::DLL_SUFFIX));
        in_directory && is_library && !self.libraries.contains_key(path)
    }

    fn add_library(&mut self, path: &Path) -> anyhow::Result<String> {
        let plugin = ExternalPlugin::load(path)?;
        let name = plugin.spec().name;
        self.registry.add_external(plugin.registry_entry())?;
        self.catalog.push(Box::new(plugin));
        self.libraries.insert(path.to_path_buf(), name);
        Ok(format!(
            "loaded plugin `{name}` from {}; enable it in the pipeline",
            path.display()
        ))
    }

    fn reload_library(
        &mut self,
        app: &mut App,
        path: &Path,
        name: &'static str,
    ) -> anyhow::Result<String> {
        let keep = || format!("kept the running `{name}`");
        let fresh = ExternalPlugin::load(path).with_context(keep)?;
        if fresh.spec().name != name {
            anyhow::bail!(
                "{}: the rebuilt library is plugin `{}`, not `{name}`",
                keep(),
                fresh.spec().name
            );
        }
        if app.is_enabled(name) {
            fresh.build(app).with_context(keep)?;
        }
        let slot = self
            .catalog
            .iter_mut()
            .find(|p| p.spec().name == name)
            .expect("a watched library's plugin is in the catalog");
        *slot = Box::new(fresh);
        Ok(format!("reloaded `{name}` from {}", path.display()))
    }

    /// Makes the pipeline-level plugins those `file` lists, with its configurations;
    /// `source` names where the change came from.
    fn apply_pipeline(
        &mut self,
        app: &mut App,
        file: PipelineFile,
        source: &str,
    ) -> anyhow::Result<String> {
        let keep = "kept the running pipeline";
        let operators = app.world.resource::<Operators>();
        let mut names: Vec<String> = app
            .enabled()
            .iter()
            .filter(|p| operators.has_plugin(p.name))
            .map(|p| p.name.to_string())
            .collect();
        names.extend(file.plugins.iter().cloned());
        let wanted: Vec<&dyn Plugin> =
            resolve(&names, &self.registry, &self.catalog).context(keep)?;
        let wanted_names: BTreeSet<&str> = wanted.iter().map(|p| p.spec().name).collect();
        let old_configs = app
            .world
            .get_resource::<PluginConfigs>()
            .cloned()
            .unwrap_or_default();
        app.world
            .insert_resource(PluginConfigs(file.configs.clone()));
        let mut changes = Vec::new();
        let enabled: Vec<&'static str> = app.enabled().iter().map(|p| p.name).collect();
        for name in enabled {
            if !wanted_names.contains(name) {
                app.remove_plugin(name)?;
                changes.push(format!("disabled `{name}`"));
            }
        }
        for plugin in wanted {
            let name = plugin.spec().name;
            // Only third-party plugins take configurations; rebuilding one re-instantiates it.
            let third_party = self.registry.get(name).is_some_and(|e| e.origin.is_some());
            let reconfigure = third_party && old_configs.0.get(name) != file.configs.get(name);
            if !app.is_enabled(name) {
                app.add_plugin(plugin)?;
                if app.world.resource::<Operators>().has_plugin(name) {
                    app.remove_plugin(name)?;
                    changes.push(format!(
                        "refused `{name}`: it is part of the model; restart to change it"
                    ));
                    continue;
                }
                changes.push(format!("enabled `{name}`"));
            } else if reconfigure {
                changes.push(format!("reconfigured `{name}`"));
            }
            if reconfigure {
                plugin.build(app)?;
            }
        }
        if changes.is_empty() {
            changes.push("no change".into());
        }
        Ok(format!("{source}: {}", changes.join(", ")))
    }
}

/// The running pipeline-level plugins and configurations, as a pipeline file would say them.
fn current_pipeline(app: &App) -> PipelineFile {
    let operators = app.world.resource::<Operators>();
    PipelineFile {
        plugins: app
            .enabled()
            .iter()
            .filter(|p| !operators.has_plugin(p.name))
            .map(|p| p.name.to_string())
            .collect(),
        configs: app
            .world
            .get_resource::<PluginConfigs>()
            .map(|c| c.0.clone())
            .unwrap_or_default(),
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// A file's modification time and length; `None` while it does not exist.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    std::fs::metadata(path)
        .and_then(|m| Ok((m.modified()?, m.len())))
        .ok()
}

/// Whether a file modified at `modified` has been left alone long enough to read.
fn settled(modified: SystemTime) -> bool {
    SystemTime::now()
        .duration_since(modified)
        .is_ok_and(|age| age >= SETTLE)
}
