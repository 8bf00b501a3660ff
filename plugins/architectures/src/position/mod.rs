//! Position family (v2220–v2239).

pub mod alibi;
pub mod learned;
pub mod nope;
pub mod rope;

use vibee_core::config::{ModelConfig, PositionKind};

/// Why a position plugin does not fit a checkpoint that encodes positions as `found`.
fn mismatch(config: &ModelConfig, found: PositionKind) -> String {
    let (how, plugin) = match found {
        PositionKind::Rope => (
            format!("rotary embeddings (rope_theta = {})", config.rope_theta),
            "rope",
        ),
        PositionKind::Alibi => ("ALiBi score biases".to_string(), "alibi"),
        PositionKind::Learned => ("a learned position table".to_string(), "learned-position"),
    };
    format!(
        "model_type {} encodes positions with {how} (use `{plugin}`)",
        config.model_type
    )
}
