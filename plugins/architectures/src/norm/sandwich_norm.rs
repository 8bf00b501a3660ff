//! v2247 `sandwich-norm`: norms both before and after each sub-layer:
//! `h = x + norm(attn(norm(x)))`, `out = h + norm(ffn(norm(h)))` (Gemma 2).

use vibee_core::config::{NormSite, Residual};
use vibee_core::PluginSpec;

use super::arrangement::Arrangement;

pub const SANDWICH_NORM: Arrangement = Arrangement {
    spec: PluginSpec {
        id: "v2247",
        name: "sandwich-norm",
    },
    fits: Residual::Sandwich,
    sites: &[
        NormSite::AttnIn,
        NormSite::AttnOut,
        NormSite::FfnIn,
        NormSite::FfnOut,
    ],
    layer: |x, norm, attention, ffn| {
        let attended = attention(&norm(NormSite::AttnIn, x));
        x.add_assign(&norm(NormSite::AttnOut, &attended));
        let fed = ffn(&norm(NormSite::FfnIn, x));
        x.add_assign(&norm(NormSite::FfnOut, &fed));
    },
};
