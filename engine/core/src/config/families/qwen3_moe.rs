//! Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention and Qwen's routed experts
//! with no shared expert.

use super::{qwen3::qwen3, qwen_experts, Family, Fields, GgufForm, Sliding};
use crate::config::{ConfigError, ModelConfig};

pub static FAMILY: Family = Family {
    model_type: "qwen3_moe",
    aliases: &[("num_local_experts", "num_experts")],
    inert: &[],
    read,
    gguf: Some(GgufForm {
        architecture: "qwen3moe",
        metadata: &[
            ("expert_count", "num_experts"),
            ("expert_used_count", "num_experts_per_tok"),
            ("expert_feed_forward_length", "moe_intermediate_size"),
        ],
        // The converter does not write `norm_topk_prob`; llama.cpp renormalises Qwen3-MoE's
        // top-k weights, as every published Qwen3-MoE config asks.
        stored: |config| {
            if let Some(moe) = &mut config.moe {
                moe.normalize_top_k = true;
            }
        },
        ..GgufForm::PLAIN
    }),
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let mut config = qwen3(f, "qwen3_moe", Sliding::QwenEverywhere)?;
    config.moe = Some(qwen_experts(f, config.num_layers, false)?);
    Ok(config)
}
