//! GPT-2: a learned position table, LayerNorm, a GELU MLP, one fused `c_attn` (all queries,
//! then keys, then values) and linear weights stored `[in, out]` (Conv1D), tied embeddings.

use serde_json::Value;

use super::{decoder, gpt_layer, Defaults, Family, Fields, GgufForm};
use crate::config::fields::invalid;
use crate::config::{ConfigError, Layout, ModelConfig, NormNames, PositionKind, QkvLayout};

pub static FAMILY: Family = Family {
    model_type: "gpt2",
    aliases: &[
        ("n_embd", "hidden_size"),
        ("n_head", "num_attention_heads"),
        ("n_layer", "num_hidden_layers"),
        ("n_positions", "max_position_embeddings"),
        ("layer_norm_epsilon", "rms_norm_eps"),
        ("activation_function", "hidden_act"),
    ],
    // The sequence-summary head of GPT2DoubleHeadsModel, not part of the language model;
    // upcasting only matters in half precision, and vibee computes attention in f32.
    inert: &[
        "summary_activation",
        "summary_first_dropout",
        "summary_proj_to_labels",
        "summary_type",
        "summary_use_proj",
        "reorder_and_upcast_attn",
    ],
    read,
    // The converter stores the Conv1D weights transposed, as every other linear weight is.
    gguf: Some(GgufForm {
        architecture: "gpt2",
        metadata: &[("feed_forward_length", "n_inner")],
        stored: |config| config.layout.transposed = false,
        ..GgufForm::PLAIN
    }),
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    f.only(
        "scale_attn_by_inverse_layer_idx",
        &Value::Bool(false),
        "gpt2",
    )?;
    f.only("scale_attn_weights", &Value::Bool(true), "gpt2")?;
    let mut config = decoder(
        f,
        "gpt2",
        Defaults {
            tie_word_embeddings: true,
            reads_head_dim: false,
            intermediate_key: Some("n_inner"),
            intermediate_per_hidden: Some(4),
            hidden_act: "gelu_new",
            ..Defaults::EPS_1E5
        },
    )?;
    // The first GPT-2 configs give the context twice, as `n_ctx` and `n_positions`.
    if let Some(context) = f.usize("n_ctx")? {
        if context != config.max_position_embeddings {
            return Err(invalid(format!(
                "gpt2: n_ctx ({context}) and n_positions ({}) disagree",
                config.max_position_embeddings
            )));
        }
    }
    config.position = PositionKind::Learned;
    gpt_layer(&mut config, true);
    config.layout = Layout {
        embed: "transformer.wte",
        position_embed: Some("transformer.wpe"),
        final_norm: "transformer.ln_f",
        layers: "transformer.h",
        attention: "attn",
        qkv: QkvLayout::Concat("c_attn"),
        o_proj: "c_proj",
        mlp_in: "c_fc",
        mlp_out: "c_proj",
        transposed: true,
        norms: NormNames::pre_norm("ln_1", "ln_2"),
        ..Layout::LLAMA
    };
    Ok(config)
}
