//! v2323 `fcfs`: first come, first served. A step serves running requests in the order they
//! were submitted and preempts the most recent first.

use vibee_core::serving::pipeline::{Ranking, SamplingParams, Timing};
use vibee_core::{App, Plugin, PluginSpec};

pub struct Fcfs;

impl Plugin for Fcfs {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2323",
            name: "fcfs",
        }
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        app.world.insert_resource(Ranking(arrival));
        Ok(())
    }
}

fn arrival(_: &SamplingParams, timing: &Timing) -> (i64, std::time::Instant) {
    (0, timing.submitted)
}
