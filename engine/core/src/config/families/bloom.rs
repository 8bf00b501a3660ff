//! BLOOM: ALiBi instead of rotary positions, a LayerNorm on the embeddings, LayerNorm with
//! biases, a tanh-GELU MLP four times as wide as the model, one fused `query_key_value` with
//! `[q, k, v]` per head, tied embeddings.

use serde_json::Value;

use super::{decoder, gpt_layer, Defaults, Family, Fields, GgufForm};
use crate::config::fields::invalid;
use crate::config::{ConfigError, Layout, ModelConfig, PositionKind, QkvLayout};

pub static FAMILY: Family = Family {
    model_type: "bloom",
    aliases: &[
        ("n_embed", "hidden_size"),
        ("n_head", "num_attention_heads"),
        ("n_layer", "num_hidden_layers"),
        ("layer_norm_epsilon", "rms_norm_eps"),
    ],
    // Megatron-DeepSpeed's training settings, kept in the published configs: kernel fusions,
    // the training sequence length, and how tensor-parallel shards were merged.
    inert: &[
        "attention_softmax_in_fp32",
        "masked_softmax_fusion",
        "bias_dropout_fusion",
        "skip_bias_add",
        "skip_bias_add_qkv",
        "offset_alibi",
        "seq_length",
        "slow_but_exact",
    ],
    read,
    // The converter regroups each head's interleaved q, k, v rows into all queries, then all
    // keys, then all values (GPT-2's order).
    gguf: Some(GgufForm {
        architecture: "bloom",
        stored: |config| config.layout.qkv = QkvLayout::Concat("query_key_value"),
        ..GgufForm::PLAIN
    }),
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    f.only(
        "apply_residual_connection_post_layernorm",
        &Value::Bool(false),
        "bloom",
    )?;
    let mut config = decoder(
        f,
        "bloom",
        Defaults {
            tie_word_embeddings: true,
            reads_head_dim: false,
            intermediate_key: None,
            intermediate_per_hidden: Some(4),
            ..Defaults::EPS_1E5
        },
    )?;
    // BLOOM's MLP is always 4 × hidden; `n_inner` is a leftover transformers never reads.
    if let Some(inner) = f.usize("n_inner")? {
        if inner != config.intermediate_size {
            return Err(invalid(format!(
                "bloom: n_inner ({inner}) differs from the 4 × hidden_size ({}) BLOOM's MLP has",
                config.intermediate_size
            )));
        }
    }
    // BLOOM's GELU is the tanh approximation and has no config key.
    config.hidden_act = "gelu_pytorch_tanh".into();
    config.position = PositionKind::Alibi;
    gpt_layer(&mut config, true);
    config.layout = LAYOUT;
    Ok(config)
}

/// BLOOM's tensor names, which Falcon shares but for the embedding norm.
pub const LAYOUT: Layout = Layout {
    embed: "transformer.word_embeddings",
    embed_norm: Some("transformer.word_embeddings_layernorm"),
    final_norm: "transformer.ln_f",
    layers: "transformer.h",
    attention: "self_attention",
    qkv: QkvLayout::Fused("query_key_value"),
    o_proj: "dense",
    mlp_in: "dense_h_to_4h",
    mlp_out: "dense_4h_to_h",
    ..Layout::LLAMA
};
