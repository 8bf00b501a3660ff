//! DeepSeek-V2: multi-head latent attention (keys and values through a compressed latent the
//! cache holds, rotary pairs interleaved), routed experts beside shared ones, the first
//! `first_k_dense_replace` layers dense.

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::{bounded, decoder, dimension, experts, Defaults, Family, Fields, GgufForm, MAX_DIM};
use crate::config::fields::invalid;
use crate::config::{ConfigError, MlaConfig, ModelConfig, MoeConfig, MoeLayout};

pub static FAMILY: Family = Family {
    model_type: "deepseek_v2",
    aliases: &[],
    // Load-balancing losses and expert parallelism of training.
    inert: &["aux_loss_alpha", "seq_aux", "ep_size"],
    read,
    gguf: Some(GgufForm {
        architecture: "deepseek2",
        metadata: &[
            ("attention.q_lora_rank", "q_lora_rank"),
            ("attention.kv_lora_rank", "kv_lora_rank"),
            ("attention.value_length_mla", "v_head_dim"),
            ("rope.dimension_count", "qk_rope_head_dim"),
            ("leading_dense_block_count", "first_k_dense_replace"),
            ("expert_count", "n_routed_experts"),
            ("expert_used_count", "num_experts_per_tok"),
            ("expert_feed_forward_length", "moe_intermediate_size"),
            ("expert_shared_count", "n_shared_experts"),
            ("expert_weights_scale", "routed_scaling_factor"),
        ],
        translate,
        ..GgufForm::PLAIN
    }),
};

/// The converter writes latent attention in its absorbed form's shapes: one key head of
/// `kv_lora_rank + rope_dim` shared by every query head. The per-head widths are the `_mla`
/// lengths.
fn translate(file: &crate::io::gguf::Gguf, config: &mut Value) -> anyhow::Result<()> {
    let key = |name: &str| format!("deepseek2.{name}");
    let number = |name: &str| {
        file.number(&key(name))
            .with_context(|| format!("the file has no {}", key(name)))
    };
    let rope = number("rope.dimension_count")?;
    config["qk_nope_head_dim"] = (number("attention.key_length_mla")? - rope).into();
    config["head_dim"] = rope.into();
    config["num_key_value_heads"] = config["num_attention_heads"].clone();
    if let Some(object) = config.as_object_mut() {
        object.remove("partial_rotary_factor");
    }
    // llama.cpp's gating numbers: 1 softmax, 2 sigmoid (DeepSeek-V3's).
    if let Some(gating) = file.number(&key("expert_gating_func")) {
        if gating != 1.0 {
            bail!("expert_gating_func {gating}: only DeepSeek-V2's softmax gating is supported");
        }
    }
    if file.get(&key("expert_weights_norm")) == Some(&crate::io::gguf::Value::Bool(true)) {
        bail!("expert_weights_norm: DeepSeek-V2 scales its top-k weights, it does not renormalise them");
    }
    if file.string(&key("rope.scaling.type")) == Some("yarn") {
        // The converter keeps one mscale, as 0.1 · mscale_all_dim, and llama.cpp takes mscale
        // to equal it, as in every published DeepSeek-V2: cos/sin unscaled, the softmax
        // sharpened by mscale².
        let mscale = number("rope.scaling.yarn_log_multiplier")? / 0.1;
        config["rope_scaling"] = json!({
            "rope_type": "yarn",
            "factor": number("rope.scaling.factor")?,
            "original_max_position_embeddings": number("rope.scaling.original_context_length")? as u64,
            "beta_fast": file.number(&key("rope.scaling.yarn_beta_fast")).unwrap_or(32.0),
            "beta_slow": file.number(&key("rope.scaling.yarn_beta_slow")).unwrap_or(1.0),
            "mscale": mscale,
            "mscale_all_dim": mscale,
        });
    }
    Ok(())
}

fn read(f: &mut Fields) -> Result<ModelConfig, ConfigError> {
    let mla = MlaConfig {
        q_lora_rank: f
            .usize("q_lora_rank")?
            .map(|r| bounded("q_lora_rank", r, MAX_DIM))
            .transpose()?,
        kv_lora_rank: dimension(f, "kv_lora_rank")?,
        nope_dim: dimension(f, "qk_nope_head_dim")?,
        rope_dim: dimension(f, "qk_rope_head_dim")?,
        v_dim: dimension(f, "v_head_dim")?,
    };
    // transformers takes `head_dim` to be the rotary width (and writes it so); the published
    // files leave it out.
    let mut config = decoder(
        f,
        "deepseek_v2",
        Defaults {
            head_dim: Some(mla.rope_dim),
            ..Defaults::LLAMA
        },
    )?;
    if config.head_dim != mla.rope_dim {
        return Err(invalid(format!(
            "deepseek_v2: head_dim ({}) must equal qk_rope_head_dim ({})",
            config.head_dim, mla.rope_dim
        )));
    }
    if let Some(qk) = f.usize("qk_head_dim")? {
        if qk != mla.nope_dim + mla.rope_dim {
            return Err(invalid(format!(
                "deepseek_v2: qk_head_dim ({qk}) must be qk_nope_head_dim + qk_rope_head_dim"
            )));
        }
    }
    config.mla = Some(mla);
    config.rope_interleaved = true;
    config.moe = routed_experts(f, config.num_layers)?;
    Ok(config)
}

fn routed_experts(f: &mut Fields, layers: usize) -> Result<Option<MoeConfig>, ConfigError> {
    f.only("scoring_func", &Value::from("softmax"), "deepseek_v2")?;
    // DeepSeek's own code makes every `moe_layer_freq`-th layer sparse, transformers every
    // layer; they agree only at 1, the value of every published file.
    f.only("moe_layer_freq", &Value::from(1), "deepseek_v2")?;
    let first_dense = f.usize("first_k_dense_replace")?.unwrap_or(0);
    // DeepSeek-V2 scales, not renormalises, its top-k weights: the key is unused.
    f.bool("norm_topk_prob")?;
    let group_limit = match f.string("topk_method")?.as_deref() {
        None | Some("greedy") => {
            f.usize("n_group")?;
            f.usize("topk_group")?;
            None
        }
        Some("group_limited_greedy") => Some((
            f.required_usize("n_group")?,
            f.required_usize("topk_group")?,
        )),
        Some(other) => {
            return Err(invalid(format!(
                "deepseek_v2: topk_method `{other}` is not supported"
            )))
        }
    };
    let Some(routed) = f.usize("n_routed_experts")?.filter(|n| *n > 0) else {
        return Ok(None);
    };
    let width = dimension(f, "moe_intermediate_size")?;
    experts(MoeConfig {
        experts: bounded("n_routed_experts", routed, MAX_DIM)?,
        top_k: f.required_usize("num_experts_per_tok")?,
        expert_intermediate: width,
        normalize_top_k: false,
        shared_intermediate: match f.usize("n_shared_experts")? {
            Some(n) if n > 0 => Some(bounded("n_shared_experts", n, MAX_DIM / width)? * width),
            _ => None,
        },
        shared_gate: false,
        routed_scale: f.f64("routed_scaling_factor")?.unwrap_or(1.0) as f32,
        group_limit,
        sparse_layers: (0..layers).map(|i| i >= first_dense).collect(),
        layout: MoeLayout::DeepSeek,
    })
    .map(Some)
}
