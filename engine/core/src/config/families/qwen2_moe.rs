//! Qwen1.5-MoE / Qwen2-MoE: Qwen2's attention (q/k/v biases unless `qkv_bias: false`) and
//! routed experts beside a shared expert behind a sigmoid gate.

use super::{decoder, qwen_experts, sliding_window, Defaults, Family, Fields, GgufForm, Sliding};
use crate::config::{ConfigError, ModelConfig};

pub static FAMILY: Family = Family {
    model_type: "qwen2_moe",
    aliases: &[],
    inert: &[],
    read,
    gguf: Some(GgufForm {
        architecture: "qwen2moe",
        metadata: &[
            ("expert_count", "num_experts"),
            ("expert_used_count", "num_experts_per_tok"),
            ("expert_feed_forward_length", "moe_intermediate_size"),
            (
                "expert_shared_feed_forward_length",
                "shared_expert_intermediate_size",
            ),
        ],
        ..GgufForm::PLAIN
    }),
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let mut config = decoder(f, "qwen2_moe", Defaults::LLAMA)?;
    config.qkv_bias = f.bool("qkv_bias")?.unwrap_or(true);
    sliding_window(f, Sliding::QwenMoe, Some(4096), &mut config)?;
    config.moe = Some(qwen_experts(f, config.num_layers, false)?);
    Ok(config)
}
