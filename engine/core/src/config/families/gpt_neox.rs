//! GPT-NeoX and Pythia: LayerNorm, attention and MLP in parallel off one residual (unless
//! `use_parallel_residual: false`), rotary on the first `rotary_pct` of each head, one fused
//! `query_key_value` holding `[q, k, v]` per head, biases everywhere.

use super::{decoder, gpt_layer, Defaults, Family, Fields, GgufForm};
use crate::config::{ConfigError, Layout, ModelConfig, NormNames, QkvLayout, Residual};

pub static FAMILY: Family = Family {
    model_type: "gpt_neox",
    aliases: &[
        ("layer_norm_eps", "rms_norm_eps"),
        ("rotary_pct", "partial_rotary_factor"),
        ("rotary_emb_base", "rope_theta"),
    ],
    inert: &[],
    read,
    // The converter regroups each head's interleaved q, k, v rows into all queries, then all
    // keys, then all values; the rotary width is `rope.dimension_count`.
    gguf: Some(GgufForm {
        architecture: "gptneox",
        metadata: &[("use_parallel_residual", "use_parallel_residual")],
        stored: |config| config.layout.qkv = QkvLayout::Concat("query_key_value"),
        ..GgufForm::PLAIN
    }),
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    // Unlike Llama's, GPT-NeoX's `attention_bias` defaults to true and puts biases on every
    // projection; read here, it is not refused by `decoder`.
    let bias = f.bool("attention_bias")?.unwrap_or(true);
    let parallel = f.bool("use_parallel_residual")?.unwrap_or(true);
    let mut config = decoder(
        f,
        "gpt_neox",
        Defaults {
            hidden_act: "gelu",
            partial_rotary: 0.25,
            ..Defaults::EPS_1E5
        },
    )?;
    gpt_layer(&mut config, true);
    (config.qkv_bias, config.o_bias) = (bias, bias);
    config.residual = if parallel {
        Residual::Parallel
    } else {
        Residual::PreNorm
    };
    config.layout = Layout {
        embed: "gpt_neox.embed_in",
        final_norm: "gpt_neox.final_layer_norm",
        lm_head: "embed_out",
        layers: "gpt_neox.layers",
        attention: "attention",
        qkv: QkvLayout::Fused("query_key_value"),
        o_proj: "dense",
        mlp_in: "dense_h_to_4h",
        mlp_out: "dense_4h_to_h",
        norms: NormNames::pre_norm("input_layernorm", "post_attention_layernorm"),
        ..Layout::LLAMA
    };
    Ok(config)
}
