//! v2322 `preemption`: when the KV pool runs short, the newest running request (by the
//! scheduling policy's order) gives its blocks back and waits; it is readmitted when there is
//! room and its cache recomputed from its tokens so far, so it loses nothing. Without this
//! plugin a request that cannot get blocks fails with the pool's numbers.

use bevy_ecs::prelude::*;
use vibee_core::{App, Plugin, PluginSpec};

pub struct Preemption;

/// Present when a short pool preempts by recompute.
#[derive(Resource, Debug, Clone, Copy)]
pub struct PreemptByRecompute;

impl Plugin for Preemption {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2322",
            name: "preemption",
        }
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        app.world.insert_resource(PreemptByRecompute);
        Ok(())
    }
}
