//! Mistral: Llama with a sliding attention window on every layer.

use super::{decoder, sliding_window, Defaults, Family, Fields, Sliding};
use crate::config::{ConfigError, ModelConfig};

pub static FAMILY: Family = Family {
    model_type: "mistral",
    aliases: &[],
    inert: &[],
    read,
    gguf: None,
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let mut config = decoder(f, "mistral", Defaults::LLAMA)?;
    sliding_window(f, Sliding::Everywhere, Some(4096), &mut config)?;
    Ok(config)
}
