//! v2324 `priority`: requests with lower `priority` values are served first and preempted
//! last (vLLM's `--scheduling-policy priority`); equal priorities go first come, first served.

use vibee_core::serving::pipeline::{Ranking, SamplingParams, Timing};
use vibee_core::{App, Plugin, PluginSpec};

pub struct Priority;

impl Plugin for Priority {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2324",
            name: "priority",
        }
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        app.world.insert_resource(Ranking(by_priority));
        Ok(())
    }
}

fn by_priority(params: &SamplingParams, timing: &Timing) -> (i64, std::time::Instant) {
    (params.priority, timing.submitted)
}
