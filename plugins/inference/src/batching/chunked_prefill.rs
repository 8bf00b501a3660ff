//! v2321 `chunked-prefill`: a prompt longer than what is left of a step's token budget
//! (`--max-num-batched-tokens`) is prefilled in chunks across steps, beside the other
//! requests' decode tokens, instead of waiting for a step with room for all of it. Decode
//! steps then never stall behind a long prompt.

use bevy_ecs::prelude::*;
use vibee_core::{App, Plugin, PluginSpec};

pub struct ChunkedPrefill;

/// Present when prompts may be split across steps.
#[derive(Resource, Debug, Clone, Copy)]
pub struct PrefillInChunks;

impl Plugin for ChunkedPrefill {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2321",
            name: "chunked-prefill",
        }
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        app.world.insert_resource(PrefillInChunks);
        Ok(())
    }
}
