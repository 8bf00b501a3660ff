//! v2302 `prefix-cache`: the paged cache of `paged-kv` that keeps every full block, keyed by
//! a hash chain of its tokens and all before them, for later requests that start the same way:
//! such a request takes those blocks (shared, reference-counted, never written again) instead
//! of recomputing them, and the forward runs only the rest of its prompt. Cached blocks no
//! request holds are evicted least recently used first when the pool needs room.
//! `--plugin-config prefix-cache=block=16,blocks=N|memory=GB`, as for `paged-kv`.

use vibee_core::{App, Plugin, PluginSpec};

pub struct PrefixCache;

impl Plugin for PrefixCache {
    fn spec(&self) -> PluginSpec {
        PluginSpec {
            id: "v2302",
            name: "prefix-cache",
        }
    }

    fn build(&self, app: &mut App) -> anyhow::Result<()> {
        super::paged::register(app, "prefix-cache", true)
    }
}
