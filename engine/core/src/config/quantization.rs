//! `quantization_config`: which quantization plugin the stored tensors need.

use serde_json::Value;

use super::fields::{invalid, Fields};
use super::ConfigError;

/// Settings of a GPTQ `quantization_config` that record how the checkpoint was made and do not
/// change what its tensors mean.
const GPTQ_PROVENANCE_KEYS: &[&str] = &[
    "damp_percent",
    "damp_auto_increment",
    "static_groups",
    "true_sequential",
    "model_name_or_path",
    "model_file_base_name",
    "meta",
    "dataset",
    "tokenizer",
    "use_exllama",
    "exllama_config",
    "cache_block_outputs",
    "batch_size",
    "pad_token_id",
    "use_cuda_fp16",
    "max_input_length",
    "module_name_preceding_first_block",
    "modules_in_block_to_quantize",
    "backend",
    "quantizer",
    "mse",
    "v2",
    "v2_alpha",
    "model_seqlen",
    "block_name_to_quantize",
    "disable_exllama",
];

/// Reads `quantization_config`: the plugin the stored tensors need (`awq` for AutoAWQ's GEMM
/// layout, `gptq` for GPTQ's, `hqq` for the `hqq` package's), after refusing every variant
/// whose tensors mean something else, and AWQ's and GPTQ's `group_size` (which the loaders
/// hold to the tensors' grouping; bit widths they read from the tensors' shapes).
pub fn quantization_config<'a>(
    f: &mut Fields<'a>,
) -> Result<(Option<&'static str>, Option<i64>), ConfigError> {
    let Some(value) = f.get("quantization_config") else {
        return Ok((None, None));
    };
    let map = value
        .as_object()
        .ok_or_else(|| invalid("`quantization_config` must be an object".into()))?;
    let mut q = Fields::new(map);
    let method = q
        .string("quant_method")?
        .ok_or_else(|| invalid("`quantization_config` needs `quant_method`".into()))?;
    let bits = q.usize("bits")?.unwrap_or(0);
    let group = q.get("group_size").and_then(Value::as_i64);
    let group_fits = || {
        if group == Some(-1) || group.is_some_and(|g| g > 0 && g % 32 == 0) {
            return Ok(());
        }
        Err(invalid(format!(
            "quantization_config.group_size must be a multiple of 32 or -1, got {}",
            map.get("group_size").unwrap_or(&Value::Null)
        )))
    };
    let plugin = match method.as_str() {
        "awq" => {
            group_fits()?;
            if bits != 4 {
                return Err(invalid(format!("AWQ with {bits} bits is not supported (4)")));
            }
            let version = q.string("version")?.unwrap_or_else(|| "gemm".into());
            if !version.eq_ignore_ascii_case("gemm") {
                return Err(invalid(format!(
                    "AWQ version `{version}` is not supported: vibee reads AutoAWQ's GEMM layout"
                )));
            }
            if q.bool("zero_point")? == Some(false) {
                return Err(invalid("AWQ without zero points is not supported".into()));
            }
            q.get("modules_to_not_convert");
            "awq"
        }
        "gptq" => {
            group_fits()?;
            if !matches!(bits, 4 | 8) {
                return Err(invalid(format!("GPTQ with {bits} bits is not supported (4 or 8)")));
            }
            if let Some(format) = q.string("checkpoint_format")? {
                if format != "gptq" {
                    return Err(invalid(format!(
                        "GPTQ checkpoint_format `{format}` is not supported: vibee reads `gptq` (zero points stored minus one)"
                    )));
                }
            }
            if q.bool("lm_head")? == Some(true) {
                return Err(invalid("GPTQ checkpoints with a quantized lm_head are not supported".into()));
            }
            if let Some(pack) = q.string("pack_dtype")? {
                if pack != "int32" {
                    return Err(invalid(format!("GPTQ pack_dtype `{pack}` is not supported (int32)")));
                }
            }
            // Both are visible in the tensors: zero points and `g_idx`.
            q.bool("sym")?;
            q.bool("desc_act")?;
            "gptq"
        }
        "hqq" => {
            // Each layer stores its own settings (bits, group size, axis, packing) beside its
            // tensors, and the loader checks those; layers left out have no `W_q`.
            q.get("quant_config");
            q.get("skip_modules");
            "hqq"
        }
        other => {
            return Err(invalid(format!(
                "quantization method `{other}` is not supported (supported: awq, gptq, hqq; GGUF files load directly)"
            )))
        }
    };
    let provenance = if plugin == "gptq" {
        GPTQ_PROVENANCE_KEYS
    } else {
        &[]
    };
    f.adopt("quantization_config", &q, |k| provenance.contains(&k));
    let group = if plugin == "hqq" { None } else { group };
    Ok((Some(plugin), group))
}
