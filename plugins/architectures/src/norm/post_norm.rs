//! v2245 `post-norm`: each sub-layer reads the raw residual stream and its output is
//! normalised before it is added back: `h = x + norm(attn(x))`, `out = h + norm(ffn(h))`
//! (OLMo 2).

use vibee_core::config::{NormSite, Residual};
use vibee_core::PluginSpec;

use super::arrangement::Arrangement;

pub const POST_NORM: Arrangement = Arrangement {
    spec: PluginSpec {
        id: "v2245",
        name: "post-norm",
    },
    fits: Residual::PostNorm,
    sites: &[NormSite::AttnOut, NormSite::FfnOut],
    layer: |x, norm, attention, ffn| {
        let attended = attention(x);
        x.add_assign(&norm(NormSite::AttnOut, &attended));
        let fed = ffn(x);
        x.add_assign(&norm(NormSite::FfnOut, &fed));
    },
};
