//! StarCoder2: LayerNorm, a plain GELU MLP, biases on every projection (`use_bias`), a sliding
//! window on every layer, tied embeddings.

use serde_json::Value;

use super::{decoder, sliding_window, Defaults, Family, Fields, GgufForm, Sliding};
use crate::config::{ConfigError, FfnKind, Layout, ModelConfig, NormKind};

pub static FAMILY: Family = Family {
    model_type: "starcoder2",
    aliases: &[("norm_epsilon", "rms_norm_eps")],
    // Leftovers of BigCode's GPTBigCode configs in the published files, which StarCoder2's
    // modeling code never reads (it reads `hidden_act` and `norm_epsilon`).
    inert: &[
        "activation_function",
        "layer_norm_epsilon",
        "attention_softmax_in_fp32",
        "scale_attention_softmax_in_fp32",
        "scale_attn_weights",
    ],
    read,
    // The converter writes no sliding window, and llama.cpp attends over the whole context.
    gguf: GgufForm::plain("starcoder2"),
};

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let mut config = decoder(
        f,
        "starcoder2",
        Defaults {
            tie_word_embeddings: true,
            hidden_act: "gelu_pytorch_tanh",
            ..Defaults::EPS_1E5
        },
    )?;
    // The only values transformers' StarCoder2 knows.
    f.only("mlp_type", &Value::from("default"), "starcoder2")?;
    f.only("norm_type", &Value::from("layer_norm"), "starcoder2")?;
    let bias = f.bool("use_bias")?.unwrap_or(true);
    (config.qkv_bias, config.o_bias) = (bias, bias);
    // Its LayerNorms have biases whatever `use_bias` says.
    config.norm = NormKind::Layer { bias: true };
    config.ffn = FfnKind::Plain { bias };
    config.layout = Layout {
        mlp_in: "c_fc",
        mlp_out: "c_proj",
        ..Layout::LLAMA
    };
    sliding_window(f, Sliding::Everywhere, None, &mut config)?;
    Ok(config)
}
