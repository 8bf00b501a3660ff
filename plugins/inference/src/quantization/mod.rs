//! Quantization (v2340–v2359): how linear layers store and multiply their weights.

pub mod awq;
pub mod calibration;
pub mod gguf;
pub mod gptq;
pub mod hqq;
pub mod int8;
pub mod integer;
pub mod offline;
pub mod q4;

use std::sync::Arc;

use anyhow::{bail, Context};
use vibee_core::config::ModelConfig;
use vibee_core::external::PluginConfigs;
use vibee_core::ops::{BuildContext, Factory, Operator, Quantization};
use vibee_core::weights::Weight;
use vibee_core::App;

/// The factory of a quantizer that starts from full-precision weights.
struct FromFullPrecision<Q> {
    plugin: &'static str,
    scheme: Q,
}

impl<Q: Quantization + Clone + 'static> Factory<dyn Quantization> for FromFullPrecision<Q> {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        full_precision(config, self.plugin)
    }

    fn build(
        &self,
        _cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Quantization>> {
        Ok(Box::new(self.scheme.clone()))
    }
}

/// Registers `plugin`'s quantization `scheme` as the operator of the quantization slot.
fn register<Q: Quantization + Clone + 'static>(app: &mut App, plugin: &'static str, scheme: Q) {
    app.register_operator(Operator::Quantization(Arc::new(FromFullPrecision {
        plugin,
        scheme,
    })));
}

/// Quantizers that start from full-precision weights refuse checkpoints stored quantized.
fn full_precision(config: &ModelConfig, plugin: &str) -> Result<(), String> {
    match config.quantization {
        None => Ok(()),
        Some(stored) => Err(format!(
            "the checkpoint is stored quantized (needs `{stored}`); {plugin} quantizes full-precision weights"
        )),
    }
}

/// Loaders of checkpoints stored quantized fit only checkpoints whose config names `method`.
fn stored_checkpoint(config: &ModelConfig, method: &str) -> Result<(), String> {
    match config.quantization {
        Some(stored) if stored == method => Ok(()),
        Some(stored) => Err(format!("the checkpoint is stored for `{stored}`, not `{method}`")),
        None => Err(format!(
            "the checkpoint is not quantized with {method} (no quantization_config with quant_method `{method}`; make one with `vibee quantize --method {method}`)"
        )),
    }
}

/// A weight whose rows split into whole quantization groups of `group` elements.
fn whole_blocks(name: &str, weight: &Weight, group: usize) -> anyhow::Result<()> {
    let cols = weight.shape[1];
    if !cols.is_multiple_of(group) {
        anyhow::bail!("`{name}` has {cols} columns, not a multiple of the group size {group}");
    }
    Ok(())
}

/// The group size `--plugin-config PLUGIN=group=N` gives (32, 64 or 128), else `default`.
fn configured_group(app: &App, plugin: &str, default: usize) -> anyhow::Result<usize> {
    let Some(text) = app
        .world
        .get_resource::<PluginConfigs>()
        .and_then(|c| c.0.get(plugin).cloned())
    else {
        return Ok(default);
    };
    let value = text
        .strip_prefix("group=")
        .with_context(|| format!("{plugin}'s configuration is `group=N`, not `{text}`"))?;
    match value.parse() {
        Ok(group @ (32 | 64 | 128)) => Ok(group),
        _ => bail!("{plugin}'s group must be 32, 64 or 128, not `{value}`"),
    }
}
