//! Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention and Qwen's routed experts
//! with no shared expert.

use super::{qwen3::qwen3, qwen_experts, Family, Fields};
use crate::config::{ConfigError, ModelConfig};

pub static FAMILY: Family = Family {
    model_type: "qwen3_moe",
    aliases: &[("num_local_experts", "num_experts")],
    inert: &[],
    read,
    gguf: None,
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let mut config = qwen3(f, "qwen3_moe")?;
    config.moe = Some(qwen_experts(f, config.num_layers, false)?);
    Ok(config)
}
