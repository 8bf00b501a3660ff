//! Qwen2 and Qwen2.5: Llama with biases on the q, k and v projections (always: no key says
//! so) and Qwen's optional sliding window.

use serde_json::Value;

use super::{decoder, sliding_window, Defaults, Family, Fields, GgufForm, Sliding};
use crate::config::{ConfigError, ModelConfig};

pub static FAMILY: Family = Family {
    model_type: "qwen2",
    aliases: &[],
    inert: &[],
    read,
    gguf: GgufForm::plain("qwen2"),
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let mut config = decoder(f, "qwen2", Defaults::LLAMA)?;
    // Multimodal rotary sections belong to Qwen2-VL, whose text model is not this family.
    f.only("use_mrope", &Value::Bool(false), "qwen2")?;
    config.qkv_bias = true;
    sliding_window(f, Sliding::Qwen, Some(4096), &mut config)?;
    Ok(config)
}
