//! OLMo 2: norms after attention and feed-forward (not before), and an RMSNorm over the whole
//! query and key projections.

use super::{decoder, Defaults, Family, Fields, GgufForm};
use crate::config::{ConfigError, ModelConfig, NormNames, QkNormScope, Residual};

pub static FAMILY: Family = Family {
    model_type: "olmo2",
    aliases: &[],
    inert: &[],
    read,
    gguf: GgufForm::plain("olmo2"),
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let mut config = decoder(f, "olmo2", Defaults::EPS_1E5)?;
    config.qk_norm = Some(QkNormScope::Whole);
    config.residual = Residual::PostNorm;
    config.layout.norms = NormNames {
        attn_in: None,
        attn_out: Some("post_attention_layernorm"),
        ffn_in: None,
        ffn_out: Some("post_feedforward_layernorm"),
    };
    Ok(config)
}
