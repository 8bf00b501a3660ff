//! v2244 `pre-norm`: each sub-layer reads a normalised copy of the residual stream and adds
//! its output back: `h = x + attn(norm(x))`, `out = h + ffn(norm(h))` (Llama, Mistral, Qwen,
//! Gemma, GPT-2, BLOOM).

use vibee_core::config::{NormSite, Residual};
use vibee_core::PluginSpec;

use super::arrangement::Arrangement;

pub const PRE_NORM: Arrangement = Arrangement {
    spec: PluginSpec {
        id: "v2244",
        name: "pre-norm",
    },
    fits: Residual::PreNorm,
    sites: &[NormSite::AttnIn, NormSite::FfnIn],
    layer: |x, norm, attention, ffn| {
        let attended = attention(&norm(NormSite::AttnIn, x));
        x.add_assign(&attended);
        let fed = ffn(&norm(NormSite::FfnIn, x));
        x.add_assign(&fed);
    },
};
