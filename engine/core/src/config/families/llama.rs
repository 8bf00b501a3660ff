//! Llama 1/2/3 and everything published in its shape (TinyLlama, SmolLM, CodeLlama, Vicuna, …).

use serde_json::Value;

use super::{decoder, Defaults, Family, Fields, GgufForm};
use crate::config::{ConfigError, ModelConfig};

pub static FAMILY: Family = Family {
    model_type: "llama",
    // The first converted Llama checkpoints (Vicuna v0, early LLaMA ports) name the context
    // this way.
    aliases: &[("max_sequence_length", "max_position_embeddings")],
    // Left by the nanotron and transformers.js exports of SmolLM2 (Hugging Face's own
    // Llama-shaped models); transformers reads neither.
    inert: &["is_llama_config", "transformers.js_config"],
    read,
    // The converter permutes each head's q/k rows so that rotary pairs are neighbours;
    // rotating neighbouring pairs gives the same attention scores.
    gguf: Some(GgufForm {
        architecture: "llama",
        stored: |config| config.rope_interleaved = true,
        ..GgufForm::PLAIN
    }),
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    // nanotron's flag for rotating neighbouring pairs, which transformers' Llama never does: the
    // exported SmolLM2 files say false, the rotation transformers applies.
    f.only("rope_interleaved", &Value::Bool(false), "llama")?;
    decoder(f, "llama", Defaults::LLAMA)
}
