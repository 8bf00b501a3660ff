//! The `App`: one bevy_ecs `World`, the pipeline schedules, and the enabled plugins.

pub mod plugin;
pub mod registry;

use std::collections::BTreeSet;

use bevy_ecs::prelude::*;
use bevy_ecs::schedule::{ExecutorKind, IntoScheduleConfigs, ScheduleLabel, SystemSet};
use bevy_ecs::system::ScheduleSystem;

use crate::app::plugin::{Plugin, PluginSpec};
use crate::model::ops::{Operator, Operators};

/// The stages of the engine's pipelines, each a schedule.
#[derive(ScheduleLabel, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    Admit,
    Forward,
    Sample,
    Filter,
    Emit,
    Monitor,
    Batch,
    Backward,
    Optimize,
    Checkpoint,
}

/// Where in its stage a system runs: plugins' systems are `Main`; hooks that must see or
/// change what they work on first (logits processors before the sampler, detokenizing before
/// text filters) are `Early`, observers of the finished stage are `Late`.
#[derive(SystemSet, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Order {
    Early,
    Main,
    Late,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pipeline {
    Serving,
    Training,
}

impl Pipeline {
    pub fn stages(self) -> &'static [Stage] {
        match self {
            Pipeline::Serving => &[
                Stage::Admit,
                Stage::Forward,
                Stage::Sample,
                Stage::Filter,
                Stage::Emit,
                Stage::Monitor,
            ],
            Pipeline::Training => &[
                Stage::Batch,
                Stage::Forward,
                Stage::Backward,
                Stage::Optimize,
                Stage::Checkpoint,
                Stage::Monitor,
            ],
        }
    }
}

/// Names of the enabled plugins; every plugin system runs only while its plugin is in here, so
/// disabling a plugin between steps takes its systems out without rebuilding schedules.
#[derive(Resource, Default, Debug)]
pub struct EnabledPlugins(pub BTreeSet<&'static str>);

pub struct App {
    pub world: World,
    pipeline: Pipeline,
    enabled: Vec<PluginSpec>,
    /// Plugins whose `build` has run; enabling one again only flips it back on.
    built: BTreeSet<&'static str>,
    /// The plugin whose `build` is running, so its systems and operators are tagged with it.
    building: Option<&'static str>,
    /// Run before every step, where changes to the pipeline are safe (hot reload).
    boundary: Vec<BoundaryHook>,
}

pub type BoundaryHook = Box<dyn FnMut(&mut App) + Send>;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AppError {
    #[error("plugin `{0}` is already enabled")]
    AlreadyEnabled(String),
    #[error("plugin `{0}` is not enabled")]
    NotEnabled(String),
    #[error("plugin `{plugin}` could not start: {message}")]
    Build { plugin: String, message: String },
}

impl App {
    pub fn new(pipeline: Pipeline) -> Self {
        let mut world = World::new();
        let mut schedules = Schedules::default();
        for &stage in Pipeline::Serving
            .stages()
            .iter()
            .chain(Pipeline::Training.stages())
        {
            let mut schedule = Schedule::new(stage);
            // Stages are short and the hot path parallelises inside operators (rayon), so a
            // thread pool per stage would only add latency.
            schedule.set_executor_kind(ExecutorKind::SingleThreaded);
            schedule.configure_sets((Order::Early, Order::Main, Order::Late).chain());
            schedules.insert(schedule);
        }
        world.insert_resource(schedules);
        world.init_resource::<Operators>();
        world.init_resource::<EnabledPlugins>();
        Self {
            world,
            pipeline,
            enabled: Vec::new(),
            built: BTreeSet::new(),
            building: None,
            boundary: Vec::new(),
        }
    }

    pub fn add_plugin(&mut self, plugin: &dyn Plugin) -> Result<(), AppError> {
        let spec = plugin.spec();
        if self.is_enabled(spec.name) {
            return Err(AppError::AlreadyEnabled(spec.name.into()));
        }
        if !self.built.contains(spec.name) {
            self.building = Some(spec.name);
            let built = plugin.build(self);
            self.building = None;
            built.map_err(|e| AppError::Build {
                plugin: spec.name.into(),
                message: format!("{e:#}"),
            })?;
            self.built.insert(spec.name);
        } else {
            self.world
                .resource_mut::<Operators>()
                .set_enabled(spec.name, true);
        }
        self.enabled.push(spec);
        self.world
            .resource_mut::<EnabledPlugins>()
            .0
            .insert(spec.name);
        Ok(())
    }

    /// Disables a plugin between steps: its systems stop running and its operators are no
    /// longer offered (a model already built keeps the operators it was built with).
    pub fn remove_plugin(&mut self, name: &str) -> Result<(), AppError> {
        let index = self
            .enabled
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| AppError::NotEnabled(name.into()))?;
        let spec = self.enabled.remove(index);
        self.world
            .resource_mut::<EnabledPlugins>()
            .0
            .remove(spec.name);
        self.world
            .resource_mut::<Operators>()
            .set_enabled(spec.name, false);
        Ok(())
    }

    pub fn is_enabled(&self, name: &str) -> bool {
        self.enabled.iter().any(|p| p.name == name)
    }

    pub fn enabled(&self) -> &[PluginSpec] {
        &self.enabled
    }

    /// Adds systems to a stage; inside a plugin's `build` they run only while it is enabled.
    pub fn add_systems<M>(
        &mut self,
        stage: Stage,
        systems: impl IntoScheduleConfigs<ScheduleSystem, M>,
    ) -> &mut Self {
        self.add_systems_at(stage, Order::Main, systems)
    }

    /// Adds systems to a stage at a given place in it (see [`Order`]).
    pub fn add_systems_at<M>(
        &mut self,
        stage: Stage,
        order: Order,
        systems: impl IntoScheduleConfigs<ScheduleSystem, M>,
    ) -> &mut Self {
        let systems = systems.in_set(order);
        let mut schedules = self.world.resource_mut::<Schedules>();
        match self.building {
            Some(name) => schedules.add_systems(
                stage,
                systems.run_if(move |enabled: Res<EnabledPlugins>| enabled.0.contains(name)),
            ),
            None => schedules.add_systems(stage, systems),
        };
        self
    }

    /// Registers an operator for the plugin being built.
    pub fn register_operator(&mut self, operator: Operator) -> &mut Self {
        let plugin = self
            .building
            .expect("operators are registered from a plugin's build");
        self.world
            .resource_mut::<Operators>()
            .register(plugin, operator);
        self
    }

    /// Runs `hook` before every step, where it may add, remove or replace plugins.
    pub fn on_step_boundary(&mut self, hook: BoundaryHook) {
        self.boundary.push(hook);
    }

    /// Runs one engine step: the boundary hooks, then every stage of the pipeline, in order.
    /// A plugin a system took out of [`EnabledPlugins`] during the step (one that panicked) is
    /// disabled afterwards.
    pub fn step(&mut self) {
        let mut hooks = std::mem::take(&mut self.boundary);
        for hook in &mut hooks {
            hook(self);
        }
        hooks.append(&mut self.boundary);
        self.boundary = hooks;
        for &stage in self.pipeline.stages() {
            self.world.run_schedule(stage);
        }
        let enabled = &self.world.resource::<EnabledPlugins>().0;
        let dropped: Vec<&'static str> = self
            .enabled
            .iter()
            .map(|p| p.name)
            .filter(|name| !enabled.contains(name))
            .collect();
        for name in dropped {
            self.enabled.retain(|p| p.name != name);
            self.world
                .resource_mut::<Operators>()
                .set_enabled(name, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Resource, Default)]
    struct Ticks(u32);

    struct Ticker;

    impl Plugin for Ticker {
        fn spec(&self) -> PluginSpec {
            PluginSpec {
                id: "v2640",
                name: "ticker",
            }
        }

        fn build(&self, app: &mut App) -> anyhow::Result<()> {
            app.world.init_resource::<Ticks>();
            app.add_systems(Stage::Monitor, |mut ticks: ResMut<Ticks>| ticks.0 += 1);
            Ok(())
        }
    }

    #[test]
    fn plugin_systems_run_each_step_until_the_plugin_is_removed() {
        let mut app = App::new(Pipeline::Serving);
        app.add_plugin(&Ticker).unwrap();
        assert_eq!(
            app.add_plugin(&Ticker),
            Err(AppError::AlreadyEnabled("ticker".into()))
        );
        app.step();
        app.step();
        assert_eq!(app.world.resource::<Ticks>().0, 2);
        app.remove_plugin("ticker").unwrap();
        app.step();
        assert_eq!(app.world.resource::<Ticks>().0, 2);
        assert_eq!(
            app.remove_plugin("ticker"),
            Err(AppError::NotEnabled("ticker".into()))
        );
        app.add_plugin(&Ticker).unwrap();
        app.step();
        assert_eq!(
            app.world.resource::<Ticks>().0,
            3,
            "re-enabling must not add its systems twice"
        );
    }

    #[test]
    fn training_pipeline_runs_its_own_stages() {
        let mut app = App::new(Pipeline::Training);
        app.add_plugin(&Ticker).unwrap();
        app.step();
        assert_eq!(app.world.resource::<Ticks>().0, 1);
        assert_eq!(Pipeline::Training.stages()[0], Stage::Batch);
    }
}
