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

use integer::IntegerWeights;

use anyhow::{bail, Context};
use vibee_core::backend::{Backend, LinearWeight};
use vibee_core::config::ModelConfig;
use vibee_core::io::weights::{Weight, Weights};
use vibee_core::model::ops::{BuildContext, Factory, Linear, Operator, Quantization};
use vibee_core::serving::external::PluginConfigs;
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

/// Reads one layer of a checkpoint stored in a packed layout: `(weights, prefix, out, in)`.
type ReadLayer = fn(&Weights, &str, usize, usize) -> anyhow::Result<IntegerWeights>;

/// The loader of checkpoints stored quantized by `method` (AutoAWQ, GPTQ, HQQ): it fits only
/// checkpoints whose config names `method`, reads the packed layers (those with a `marker`
/// tensor) with `read`, and leaves the layers they store in full precision (the LM head) dense.
#[derive(Clone, Copy)]
struct StoredLayout {
    method: &'static str,
    marker: &'static str,
    read: ReadLayer,
    /// The config's `group_size`, which each layer's grouping must be.
    group_size: Option<i64>,
}

/// Registers the loader of `method`'s packed layout, whose layers hold a `qweight`.
fn register_stored(app: &mut App, method: &'static str, read: ReadLayer) {
    app.register_operator(Operator::Quantization(Arc::new(StoredLayout {
        method,
        marker: "qweight",
        read,
        group_size: None,
    })));
}

impl Factory<dyn Quantization> for StoredLayout {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        let method = self.method;
        match config.quantization {
            Some(stored) if stored == method => Ok(()),
            Some(stored) => Err(format!("the checkpoint is stored for `{stored}`, not `{method}`")),
            None => Err(format!(
                "the checkpoint is not quantized with {method} (no quantization_config with quant_method `{method}`; make one with `vibee quantize --method {method}`)"
            )),
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Quantization>> {
        Ok(Box::new(StoredLayout {
            group_size: cx.config.quantization_group_size,
            ..*self
        }))
    }
}

impl Quantization for StoredLayout {
    fn linear(
        &self,
        backend: &dyn Backend,
        _name: &str,
        weight: Weight,
    ) -> anyhow::Result<Box<dyn Linear>> {
        Ok(backend.linear(LinearWeight::Dense(weight)))
    }

    fn stored_linear(
        &self,
        backend: &dyn Backend,
        weights: &Weights,
        name: &str,
        out: usize,
        inp: usize,
    ) -> anyhow::Result<Option<Box<dyn Linear>>> {
        let prefix = name.strip_suffix(".weight").unwrap_or(name);
        if !weights.contains(&format!("{prefix}.{}", self.marker)) {
            return Ok(None);
        }
        let layer = (self.read)(weights, prefix, out, inp)
            .with_context(|| format!("cannot read the {} layer `{prefix}`", self.method))?;
        if let Some(said) = self.group_size {
            let (groups, held) = (layer.groups(), inp / layer.groups());
            let size = usize::try_from(said).unwrap_or(inp);
            anyhow::ensure!(
                size == held,
                "quantization_config.group_size is {said}, but `{prefix}` holds {groups} groups of {held} for its {inp} inputs"
            );
        }
        layer.into_linear(backend, prefix).map(Some)
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
