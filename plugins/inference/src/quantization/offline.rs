//! `vibee quantize`: a full-precision checkpoint directory in, a quantized one out, in the
//! layouts the loaders read — AutoAWQ's GEMM layout for `q4` and `awq`, GPTQ's for `int8`
//! and `gptq`, the `hqq` package's for `hqq` — with the original config (plus its
//! `quantization_config`), tokenizer files and unquantized tensors (embeddings, norms, LM
//! head).

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, ensure, Context};
use safetensors::tensor::TensorView;
use vibee_core::app::plugin::resolve;
use vibee_core::app::{App, Pipeline};
use vibee_core::config::{FfnKind, ModelConfig, NormKind, NormSite, QkvLayout, Residual};
use vibee_core::io::weights::{WeightError, Weights};
use vibee_core::model::checkpoint::Checkpoint;
use vibee_core::model::ops::{BuildContext, Factory, Operator, Operators, Quantization};
use vibee_core::serving::engine::expand_auto;
use vibee_core::{Model, Plugin, Registry};

use super::calibration::{InputStats, Recorder};
use super::integer::{IntegerWeights, StoredTensor};
use super::{awq, gptq, hqq};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Int8,
    Q4,
    Awq,
    Gptq,
    Hqq,
}

impl Method {
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "int8" => Self::Int8,
            "q4" => Self::Q4,
            "awq" => Self::Awq,
            "gptq" => Self::Gptq,
            "hqq" => Self::Hqq,
            other => bail!("unknown method `{other}` (int8, q4, awq, gptq, hqq)"),
        })
    }

    fn calibrated(self) -> bool {
        matches!(self, Self::Awq | Self::Gptq)
    }
}

pub struct Options {
    pub method: Method,
    /// Weights per group along a row (int4 methods).
    pub group: usize,
    /// GPTQ's bit width: 4 or 8.
    pub bits: u32,
    /// GPTQ: quantize columns in decreasing order of activation energy.
    pub act_order: bool,
    /// Calibration text (AWQ, GPTQ).
    pub calibration: Option<String>,
    /// At most this many calibration tokens are used.
    pub calibration_tokens: usize,
    /// Bytes of input statistics (`in² · 4` per projection) held at once: decoder layers are
    /// calibrated in windows that fit, one pass of the calibration text per window.
    pub hessian_budget: usize,
}

/// What `vibee quantize` did.
#[derive(Debug)]
pub struct Summary {
    pub quantized: usize,
    /// Linear layers left in full precision (the LM head, shapes that do not fit).
    pub kept: Vec<String>,
    pub calibration_tokens: usize,
    pub bytes_before: usize,
    pub bytes_after: usize,
}

/// Tokens per calibration sequence (bounded by the model's context).
const CALIBRATION_SEQUENCE: usize = 512;

/// Files of a checkpoint directory that hold weights (never copied into the output).
const WEIGHT_FILES: &[&str] = &[
    ".safetensors",
    ".safetensors.index.json",
    ".bin",
    ".bin.index.json",
    ".pth",
    ".pt",
    ".gguf",
    ".msgpack",
    ".h5",
    ".ckpt",
    ".onnx",
];

/// GPTQ's damping: 1% of the Hessian's mean diagonal (the paper's and AutoGPTQ's default).
const GPTQ_DAMPING: f64 = 0.01;

/// Quantizes the checkpoint in `model` into the new directory `out`. `progress(stage, done,
/// total)` reports calibration tokens, then layers.
pub fn quantize_checkpoint(
    model: &Path,
    out: &Path,
    options: &Options,
    registry: &Registry,
    catalog: &[Box<dyn Plugin>],
    progress: &mut dyn FnMut(&str, usize, usize),
) -> anyhow::Result<Summary> {
    ensure!(
        model.join("config.json").is_file(),
        "{} is not a Hugging Face checkpoint directory (vibee quantize reads config.json and safetensors)",
        model.display()
    );
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!(
            "{} exists and is not empty; choose a new directory",
            out.display()
        );
    }
    let method = options.method;
    ensure!(
        matches!(options.group, 32 | 64 | 128),
        "--group must be 32, 64 or 128, not {}",
        options.group
    );
    ensure!(matches!(options.bits, 4 | 8), "--bits must be 4 or 8");
    ensure!(
        method == Method::Gptq || (options.bits == 4 && !options.act_order),
        "--bits and --act-order are GPTQ's options"
    );
    ensure!(
        method.calibrated() || options.calibration.is_none(),
        "int8, q4 and hqq need no calibration: --calib is for awq and gptq"
    );
    let checkpoint = Checkpoint::open(model)?;
    let config = checkpoint.config()?;
    if let Some(stored) = config.quantization {
        bail!("the checkpoint is already quantized (`{stored}`)");
    }
    ensure!(
        !config.layout.transposed,
        "checkpoints storing linear weights [in, out] (GPT-2's Conv1D) cannot be written in the AutoAWQ/GPTQ layouts"
    );
    if method == Method::Awq {
        awq_fits(&config)?;
    }
    let weights = checkpoint.weights(&config)?;
    let recorder = Recorder::default();
    let recording = build_recording(&config, &weights, &recorder, registry, catalog)?;
    let ids = if method.calibrated() {
        let text = options
            .calibration
            .as_deref()
            .context("AWQ and GPTQ need calibration text: --calib FILE")?;
        let tokenizer = checkpoint
            .tokenizer(&config)?
            .context("calibration needs the checkpoint's tokenizer")?;
        let mut ids = tokenizer.encode(text)?;
        ids.truncate(options.calibration_tokens);
        ensure!(
            ids.len() >= 16,
            "the calibration text is only {} tokens; give at least 16",
            ids.len()
        );
        ids
    } else {
        Vec::new()
    };
    let group = options.group;
    let head = [
        format!("{}.weight", config.layout.lm_head),
        format!("{}.weight", config.layout.embed),
    ];
    let (mut selected, mut kept) = (Vec::new(), Vec::new());
    for (name, shape) in recorder.layers() {
        let (o, i) = (shape[0], shape[1]);
        let fits = match method {
            Method::Int8 => o % 4 == 0 && i % 32 == 0,
            Method::Gptq => o % (32 / options.bits as usize) == 0 && i % group == 0,
            Method::Q4 | Method::Awq => o % 8 == 0 && i % group == 0,
            // HQQ packs two groups to a byte: half of them in the high nibbles.
            Method::Hqq => i % group == 0 && (o * i / group).is_multiple_of(2),
        };
        if head.contains(&name) || !fits {
            kept.push(name);
        } else {
            selected.push((name, o, i));
        }
    }
    let mut floats = Floats {
        weights: &weights,
        changed: HashMap::new(),
    };
    let layer_of = |name: &str| {
        name.strip_prefix(config.layout.layers)
            .and_then(|rest| {
                rest.strip_prefix('.')?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .unwrap_or(0)
    };
    // Statistics are held only while calibrating.
    let budget = if method.calibrated() {
        options.hessian_budget
    } else {
        usize::MAX
    };
    let windows = layer_windows(&selected, &layer_of, budget);
    let mut tensors = Vec::new();
    let mut done = 0;
    for window in windows {
        let in_window = |name: &str| window.contains(&layer_of(name));
        let stats = if method.calibrated() {
            let names = selected
                .iter()
                .map(|(n, ..)| n.clone())
                .filter(|n| in_window(n));
            recorder.restrict(names.collect());
            let stage = format!("calibrating layers {}–{}", window.start, window.end - 1);
            let sequence = CALIBRATION_SEQUENCE.min(config.max_position_embeddings.max(1));
            for (i, chunk) in ids.chunks(sequence).enumerate() {
                let mut kv = recording.new_sequence();
                recording.forward(chunk, kv.as_mut(), false)?;
                progress(
                    &stage,
                    (i * sequence + chunk.len()).min(ids.len()),
                    ids.len(),
                );
            }
            recorder.stats()
        } else {
            HashMap::new()
        };
        if method == Method::Awq {
            for layer in window.clone() {
                awq_scale_layer(&config, layer, group, &mut floats, &stats)?;
                progress("searching AWQ scales", layer + 1, config.num_layers);
            }
        }
        for (name, o, i) in selected.iter().filter(|(n, ..)| in_window(n)) {
            let weight = floats.take(name)?;
            let prefix = name.strip_suffix(".weight").unwrap_or(name);
            let layer = match method {
                Method::Int8 => int8(&weight, *o, *i),
                Method::Q4 | Method::Awq => {
                    IntegerWeights::round_to_nearest(&weight, *o, *i, 4, group, false)
                }
                Method::Gptq => gptq::quantize(
                    &weight,
                    *o,
                    &input_stats(&stats, name)?.hessian,
                    options.bits,
                    group,
                    options.act_order,
                    GPTQ_DAMPING,
                )
                .with_context(|| format!("GPTQ of `{name}`"))?,
                Method::Hqq => hqq::quantize(&weight, *o, *i, group),
            };
            tensors.extend(match method {
                Method::Q4 | Method::Awq => awq::write(&layer, prefix)?,
                Method::Int8 | Method::Gptq => gptq::write(&layer, prefix)?,
                Method::Hqq => hqq::write(&layer, prefix, weights.get(name, &[*o, *i])?.dtype)?,
            });
            done += 1;
            progress("quantizing", done, selected.len());
        }
    }
    let replaced: Vec<&str> = selected.iter().map(|(n, ..)| n.as_str()).collect();
    let mut bytes_before = 0;
    for name in weights.names() {
        let weight = match weights.get(name, weights.shape(name)?) {
            Ok(weight) => weight,
            // Tensors vibee does not read as weights (old GPT-NeoX checkpoints' bool masks, i64
            // position ids, f64 buffers) pass through as stored.
            Err(WeightError::Dtype { dtype, .. }) => {
                let (bytes, shape) = weights.raw(name, &dtype)?;
                bytes_before += bytes.len();
                let dtype = serde_json::from_value(serde_json::Value::String(dtype))
                    .with_context(|| format!("`{name}` has a dtype safetensors does not know"))?;
                tensors.push(StoredTensor::raw(
                    name.to_string(),
                    dtype,
                    shape.to_vec(),
                    bytes.iter().copied(),
                ));
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        bytes_before += weight.bytes();
        if replaced.contains(&name) {
            continue;
        }
        let values = floats.take(name)?;
        tensors.push(StoredTensor::float(
            name.to_string(),
            weight.dtype,
            weight.shape.clone(),
            &values,
        ));
    }
    let bytes_after = tensors.iter().map(|t| t.bytes.len()).sum();
    write_checkpoint(
        model,
        out,
        &tensors,
        quantization_config(options, group, &kept),
    )?;
    Ok(Summary {
        quantized: selected.len(),
        kept,
        calibration_tokens: ids.len(),
        bytes_before,
        bytes_after,
    })
}

/// Consecutive decoder layers whose projections' input statistics fit `budget` bytes
/// together (each window holds one layer at least).
fn layer_windows(
    selected: &[(String, usize, usize)],
    layer_of: &dyn Fn(&str) -> usize,
    budget: usize,
) -> Vec<Range<usize>> {
    let layers = selected
        .iter()
        .map(|(n, ..)| layer_of(n) + 1)
        .max()
        .unwrap_or(1);
    let mut bytes = vec![0usize; layers];
    for (name, _, inp) in selected {
        bytes[layer_of(name)] += inp * inp * 4;
    }
    let mut windows = Vec::new();
    let (mut start, mut held) = (0, 0);
    for (layer, b) in bytes.iter().enumerate() {
        if layer > start && held + b > budget {
            windows.push(start..layer);
            (start, held) = (layer, 0);
        }
        held += b;
    }
    windows.push(start..layers);
    windows
}

/// Float tensors as the method leaves them: the checkpoint's, or AWQ's rescaled copies.
struct Floats<'a> {
    weights: &'a Weights,
    changed: HashMap<String, Vec<f32>>,
}

impl Floats<'_> {
    fn take(&mut self, name: &str) -> anyhow::Result<Vec<f32>> {
        Ok(match self.changed.remove(name) {
            Some(values) => values,
            None => self
                .weights
                .get(name, self.weights.shape(name)?)?
                .to_f32_vec(),
        })
    }
}

fn input_stats<'a>(
    stats: &'a HashMap<String, Arc<Mutex<InputStats>>>,
    name: &str,
) -> anyhow::Result<MutexGuard<'a, InputStats>> {
    let shared = stats
        .get(name)
        .with_context(|| {
            format!("`{name}` is not quantized (its shape does not fit the group size), so it recorded no calibration input")
        })?;
    Ok(shared.lock().expect("calibration has finished"))
}

/// AWQ folds its input scales into the operation before each projection, which it knows for
/// Llama-style layers only.
fn awq_fits(config: &ModelConfig) -> anyhow::Result<()> {
    let llama_like = config.residual == Residual::PreNorm
        && config.norm == NormKind::Rms
        && config.ffn == FfnKind::Gated
        && config.layout.qkv == QkvLayout::Separate
        && config.layout.gate_up.is_none()
        && config.moe.is_none()
        && config.mla.is_none();
    ensure!(
        llama_like,
        "AWQ folds its scales into Llama-style layers (pre-norm RMSNorm, separate q/k/v, gated MLP); model_type {} is not one (gptq and q4 fit any layout)",
        config.model_type
    );
    Ok(())
}

/// What a set of projections' input scales fold into: a norm's weight, or the rows of the
/// projection that produces the input.
enum Fold {
    Norm(String),
    Rows(String),
}

/// Searches and applies AWQ's scales in one decoder layer, as AutoAWQ orders it: q/k/v (into
/// the attention norm), o (into v's rows, where their shapes agree), gate/up (into the FFN
/// norm), down (into up's rows). The projections keep `W·diag(s)`, clipped (all but q and
/// k), for quantization.
fn awq_scale_layer(
    config: &ModelConfig,
    layer: usize,
    group: usize,
    floats: &mut Floats<'_>,
    stats: &HashMap<String, Arc<Mutex<InputStats>>>,
) -> anyhow::Result<()> {
    let p = format!("{}.{layer}", config.layout.layers);
    let a = format!("{p}.{}", config.layout.attention);
    let norm = |site| {
        let name = config
            .norm_tensor(site)
            .expect("a pre-norm layer has both norms");
        format!("{p}.{name}.weight")
    };
    let projection = |name: &str| format!("{a}.{name}.weight");
    let ffn = |name: &str| format!("{p}.mlp.{name}.weight");
    let mut sets = vec![(
        vec![
            projection("q_proj"),
            projection("k_proj"),
            projection("v_proj"),
        ],
        Fold::Norm(norm(NormSite::AttnIn)),
    )];
    if config.q_dim() == config.kv_dim() {
        sets.push((
            vec![projection(config.layout.o_proj)],
            Fold::Rows(projection("v_proj")),
        ));
    }
    sets.push((
        vec![ffn("gate_proj"), ffn("up_proj")],
        Fold::Norm(norm(NormSite::FfnIn)),
    ));
    sets.push((vec![ffn("down_proj")], Fold::Rows(ffn("up_proj"))));
    for (names, fold) in sets {
        let mut projections = names
            .iter()
            .map(|n| floats.take(n))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let views: Vec<&[f32]> = projections.iter().map(Vec::as_slice).collect();
        let scales = awq::search_scales(&views, &*input_stats(stats, &names[0])?, group);
        for (name, weight) in names.iter().zip(&mut projections) {
            for row in weight.chunks_exact_mut(scales.len()) {
                row.iter_mut().zip(&scales).for_each(|(w, s)| *w *= s);
            }
            // AutoAWQ leaves queries and keys unclipped: attention scores are sensitive to them.
            if !(name.contains("q_proj") || name.contains("k_proj")) {
                awq::clip(weight, &*input_stats(stats, &names[0])?, &scales, group);
            }
            floats.changed.insert(name.clone(), std::mem::take(weight));
        }
        // A norm's weight (and bias) and a producer's rows (and bias) are all indexed by the
        // input feature: dividing them divides the input by s.
        let target = match fold {
            Fold::Norm(name) | Fold::Rows(name) => name,
        };
        let bias = target.replace(".weight", ".bias");
        let biased = floats.weights.contains(&bias).then_some(bias);
        for name in std::iter::once(target).chain(biased) {
            let mut values = floats.take(&name)?;
            let per_feature = values.len() / scales.len();
            for (chunk, s) in values.chunks_exact_mut(per_feature).zip(&scales) {
                chunk.iter_mut().for_each(|v| *v /= s);
            }
            floats.changed.insert(name, values);
        }
    }
    Ok(())
}

/// Per-output-channel symmetric int8 (v2340's rule, scale stored as f16) in GPTQ's 8-bit
/// layout: `q + 128` with zero point 128.
fn int8(weight: &[f32], out: usize, inp: usize) -> IntegerWeights {
    let mut layer = IntegerWeights::zeroed(8, out, inp, inp);
    layer.zeros.fill(128.0);
    for (r, row) in weight.chunks_exact(inp).enumerate() {
        let max = row.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        let scale = half::f16::from_f32(max.max(1e-8) / 127.0).to_f32();
        layer.scales[r] = scale;
        for (q, w) in layer.quants[r * inp..(r + 1) * inp].iter_mut().zip(row) {
            *q = ((w / scale).round_ties_even().clamp(-127.0, 127.0) + 128.0) as u8;
        }
    }
    layer
}

/// The `quantization_config` of the written checkpoint; `kept` are the linear layers left in
/// full precision.
fn quantization_config(options: &Options, group: usize, kept: &[String]) -> serde_json::Value {
    match options.method {
        Method::Q4 | Method::Awq => serde_json::json!({
            "quant_method": "awq", "bits": 4, "group_size": group, "zero_point": true,
            "version": "gemm", "modules_to_not_convert": null,
        }),
        Method::Int8 => serde_json::json!({
            "quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": false,
            "sym": true, "checkpoint_format": "gptq",
        }),
        Method::Gptq => serde_json::json!({
            "quant_method": "gptq", "bits": options.bits, "group_size": group,
            "desc_act": options.act_order, "sym": false, "checkpoint_format": "gptq",
            "damp_percent": GPTQ_DAMPING, "true_sequential": false,
        }),
        // transformers' HqqConfig, as the `hqq` package's settings record it.
        Method::Hqq => serde_json::json!({
            "quant_method": "hqq",
            "quant_config": {
                "weight_quant_params": {
                    "nbits": 4, "channel_wise": true, "group_size": group, "optimize": true,
                    "round_zero": false, "axis": 1, "view_as_float": false,
                },
                "scale_quant_params": null, "zero_quant_params": null, "offload_meta": false,
            },
            "skip_modules": kept
                .iter()
                .map(|name| name.strip_suffix(".weight").unwrap_or(name))
                .collect::<Vec<_>>(),
        }),
    }
}

/// The model with every linear layer recording its inputs.
fn build_recording(
    config: &ModelConfig,
    weights: &Weights,
    recorder: &Recorder,
    registry: &Registry,
    catalog: &[Box<dyn Plugin>],
) -> anyhow::Result<Model> {
    let names = expand_auto(&["auto".to_string()], config);
    let mut app = App::new(Pipeline::Serving);
    for plugin in resolve(&names, registry, catalog)? {
        app.add_plugin(plugin)?;
    }
    app.world.resource_mut::<Operators>().register(
        "calibration",
        Operator::Quantization(Arc::new(Recording(recorder.clone()))),
    );
    Model::build(
        config.clone(),
        weights,
        app.world.resource::<Operators>(),
        vibee_core::backend::default_backend(),
    )
}

struct Recording(Recorder);

impl Factory<dyn Quantization> for Recording {
    fn check(&self, _config: &ModelConfig) -> Result<(), String> {
        Ok(())
    }

    fn build(
        &self,
        _cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn Quantization>> {
        Ok(Box::new(self.0.clone()))
    }
}

/// Writes the quantized checkpoint into a staging directory beside `out`, then renames it,
/// so a failure leaves no half-written model.
fn write_checkpoint(
    model: &Path,
    out: &Path,
    tensors: &[StoredTensor],
    quantization_config: serde_json::Value,
) -> anyhow::Result<()> {
    let name = out
        .file_name()
        .with_context(|| format!("{} names no directory", out.display()))?;
    let staging = out.with_file_name(format!(
        ".{}-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::create_dir_all(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    let written = (|| -> anyhow::Result<()> {
        let config = vibee_core::io::read_regular_text(
            &model.join("config.json"),
            vibee_core::io::SMALL_FILE,
        )?;
        let mut config: serde_json::Value = serde_json::from_str(&config)?;
        config["quantization_config"] = quantization_config;
        std::fs::write(
            staging.join("config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        for entry in std::fs::read_dir(model)? {
            let path = entry?.path();
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            // Weights in any format are not copied: the output holds its own.
            let weights = WEIGHT_FILES.iter().any(|suffix| file.ends_with(suffix));
            if path.is_file() && !weights && file != "config.json" {
                std::fs::copy(&path, staging.join(path.file_name().unwrap_or_default()))?;
            }
        }
        let views = tensors
            .iter()
            .map(|t| {
                Ok((
                    t.name.clone(),
                    TensorView::new(t.dtype, t.shape.clone(), &t.bytes)?,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(metadata), &staging.join("model.safetensors"))?;
        if out.exists() {
            std::fs::remove_dir(out)?;
        }
        std::fs::rename(&staging, out)?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    written.with_context(|| format!("cannot write the quantized checkpoint to {}", out.display()))
}
