//! Phi-3, Phi-3.5 and phi-4: Llama with fused `qkv_proj` and `gate_up_proj` and a sliding
//! window where the config gives one.

use super::{decoder, sliding_window, Defaults, Family, Fields, GgufForm, Sliding};
use crate::config::{ConfigError, Layout, ModelConfig, QkvLayout};

pub static FAMILY: Family = Family {
    model_type: "phi3",
    aliases: &[],
    inert: &[],
    read,
    // The converter keeps q/k/v fused (`attn_qkv`) and gate/up fused (`ffn_up`, gate rows
    // first), and writes the long-context factors as tensors.
    gguf: Some(GgufForm {
        architecture: "phi3",
        metadata: &[("attention.sliding_window", "sliding_window")],
        ..GgufForm::PLAIN
    }),
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let mut config = decoder(
        f,
        "phi3",
        Defaults {
            original_max_position_embeddings: Some(4096),
            ..Defaults::EPS_1E5
        },
    )?;
    config.layout = Layout {
        qkv: QkvLayout::Concat("qkv_proj"),
        gate_up: Some("gate_up_proj"),
        ..Layout::LLAMA
    };
    sliding_window(f, Sliding::Everywhere, None, &mut config)?;
    Ok(config)
}
