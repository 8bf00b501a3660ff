//! Mixtral: Mistral whose feed-forward routes each token to 2 of 8 SwiGLU experts
//! (`block_sparse_moe.{gate, experts.N.{w1, w3, w2}}`).

use super::{
    bounded, decoder, experts, sliding_window, Defaults, Family, Fields, GgufForm, Sliding, MAX_DIM,
};
use crate::config::{ConfigError, ModelConfig, MoeConfig, MoeLayout};

pub static FAMILY: Family = Family {
    model_type: "mixtral",
    aliases: &[("num_experts", "num_local_experts")],
    inert: &[],
    read,
    // The converter writes Mixtral as `llama` with experts (each layer's stacked in one 3D
    // tensor), its q/k rows permuted as for Llama.
    gguf: Some(GgufForm {
        architecture: "llama",
        when: Some("expert_count"),
        metadata: &[
            ("expert_count", "num_local_experts"),
            ("expert_used_count", "num_experts_per_tok"),
        ],
        stored: |config| config.rope_interleaved = true,
        ..GgufForm::PLAIN
    }),
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let defaults = Defaults {
        rope_theta: 1e6,
        ..Defaults::EPS_1E5
    };
    let mut config = decoder(f, "mixtral", defaults)?;
    sliding_window(f, Sliding::Everywhere, None, &mut config)?;
    config.moe = Some(experts(MoeConfig {
        experts: bounded(
            "num_local_experts",
            f.required_usize("num_local_experts")?,
            MAX_DIM,
        )?,
        top_k: f.required_usize("num_experts_per_tok")?,
        expert_intermediate: config.intermediate_size,
        normalize_top_k: true,
        shared_intermediate: None,
        shared_gate: false,
        routed_scale: 1.0,
        group_limit: None,
        sparse_layers: vec![true; config.num_layers],
        layout: MoeLayout::Mixtral,
    })?);
    Ok(config)
}
