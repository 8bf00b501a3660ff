//! v2246 `parallel-residual`: attention and feed-forward both read the layer's input, each
//! through its own norm, and both add to the residual stream:
//! `out = x + attn(norm(x)) + ffn(norm'(x))` (GPT-NeoX, Falcon).

use vibee_core::config::{NormSite, Residual};
use vibee_core::PluginSpec;

use super::arrangement::Arrangement;

pub const PARALLEL_RESIDUAL: Arrangement = Arrangement {
    spec: PluginSpec {
        id: "v2246",
        name: "parallel-residual",
    },
    fits: Residual::Parallel,
    sites: &[NormSite::AttnIn, NormSite::FfnIn],
    layer: |x, norm, attention, ffn| {
        let attended = attention(&norm(NormSite::AttnIn, x));
        let fed = ffn(&norm(NormSite::FfnIn, x));
        x.add_assign(&attended);
        x.add_assign(&fed);
    },
};
