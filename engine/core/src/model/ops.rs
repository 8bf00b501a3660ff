//! Model-level operators. Architecture plugins register factories for these slots; the model
//! builder picks one per slot and binds it to the checkpoint's weights.

use std::sync::Arc;

use bevy_ecs::prelude::Resource;

use crate::backend::kv::KvDtype;
use crate::backend::tensor::Matrix;
pub use crate::backend::{AttendOptions, AttendSequence, KvView, Linear};
use crate::backend::{Backend, LinearWeight};
use crate::config::{ModelConfig, NormSite};
use crate::io::weights::{Weight, Weights};

/// The operator slots a decoder-only transformer is built from. The first five are filled for
/// every model; the others only when the checkpoint uses that technique.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    Attention,
    Position,
    Norm,
    Ffn,
    KvCache,
    Residual,
    QkvBias,
    QkNorm,
    AttentionWindow,
    Softcap,
    Nope,
    Quantization,
    KvQuant,
}

impl Slot {
    pub const ALL: [Slot; 13] = [
        Slot::Attention,
        Slot::Position,
        Slot::Norm,
        Slot::Ffn,
        Slot::KvCache,
        Slot::Residual,
        Slot::QkvBias,
        Slot::QkNorm,
        Slot::AttentionWindow,
        Slot::Softcap,
        Slot::Nope,
        Slot::Quantization,
        Slot::KvQuant,
    ];

    /// The registry's `provides` name of this slot.
    pub fn name(self) -> &'static str {
        match self {
            Slot::Attention => "attention",
            Slot::Position => "position",
            Slot::Norm => "norm",
            Slot::Ffn => "ffn",
            Slot::KvCache => "kv-cache",
            Slot::Residual => "residual",
            Slot::QkvBias => "qkv-bias",
            Slot::QkNorm => "qk-norm",
            Slot::AttentionWindow => "attention-window",
            Slot::Softcap => "softcap",
            Slot::Nope => "nope",
            Slot::Quantization => "quantization",
            Slot::KvQuant => "kv-quant",
        }
    }
}

/// How linear layers hold and multiply their weights: a quantization scheme.
pub trait Quantization: Send + Sync {
    /// The linear layer over the checkpoint's weight `name`, stored `[out, in]`, packed as the
    /// scheme packs it and uploaded to `backend`.
    fn linear(
        &self,
        backend: &dyn Backend,
        name: &str,
        weight: Weight,
    ) -> anyhow::Result<Box<dyn Linear>>;

    /// The linear layer `name` (its `.weight` name) of shape `[out, in]`, for checkpoints that
    /// store it in tensors of their own (AutoAWQ's and GPTQ's `qweight`, `qzeros`, `scales`);
    /// `None` where the checkpoint holds a plain weight under `name`.
    /// One linear layer over the rows of `weights` stacked, in order (q, k and v; gate and
    /// up), when the scheme packs them all alike; `None` keeps them apart.
    fn stacked_linear(
        &self,
        _backend: &dyn Backend,
        _weights: Vec<Weight>,
    ) -> anyhow::Result<Option<Box<dyn Linear>>> {
        Ok(None)
    }

    fn stored_linear(
        &self,
        _backend: &dyn Backend,
        _weights: &Weights,
        _name: &str,
        _out: usize,
        _inp: usize,
    ) -> anyhow::Result<Option<Box<dyn Linear>>> {
        Ok(None)
    }
}

/// Normalises each row of its input (rows of `dim()` features).
pub trait Norm: Send + Sync {
    fn forward(&self, x: &Matrix) -> Matrix;
    fn dim(&self) -> usize;
}

/// A learned vector added to every row (projection biases).
pub trait Bias: Send + Sync {
    fn apply(&self, x: &mut Matrix);
}

/// How one layer combines its sub-layers, norms and residual connections.
pub trait Residual: Send + Sync {
    /// The norms this arrangement uses in every layer.
    fn sites(&self) -> &'static [NormSite];
    /// Runs one layer over `x` in place; `norm` applies the layer's norm at a site.
    fn layer(
        &self,
        x: &mut Matrix,
        norm: &dyn Fn(NormSite, &Matrix) -> Matrix,
        attention: &mut dyn FnMut(&Matrix) -> Matrix,
        ffn: &dyn Fn(&Matrix) -> Matrix,
    );
}

/// Layers that attend with no position encoding at all (NoPE).
pub trait NoPosition: Send + Sync {
    fn skips(&self, layer: usize) -> bool;
}

/// Soft caps `c · tanh(x / c)` on attention scores and on final logits.
pub trait Softcap: Send + Sync {
    fn attention(&self) -> Option<f32>;
    fn logits(&self) -> Option<f32>;
}

/// Which earlier tokens a layer's queries may see, beyond causality.
pub trait AttentionWindow: Send + Sync {
    /// `Some(w)`: a query at position `p` sees positions `p + 1 - w ..= p` in `layer`.
    fn window(&self, layer: usize) -> Option<usize>;
}

pub trait PositionEncoding: Send + Sync {
    /// Encodes `positions[i]` into row `i` of `x` (queries or keys), which holds `heads` heads
    /// side by side. Encodings that act on attention scores instead leave `x` as it is.
    fn apply(&self, x: &mut Matrix, heads: usize, positions: &[usize]);
    /// Adds position information to the token embeddings, for learned absolute positions.
    fn embed(&self, _x: &mut Matrix, _positions: &[usize]) {}
    /// Per-head slopes of linear score biases `slope · key_position`, for ALiBi.
    fn alibi_slopes(&self) -> Option<&[f32]> {
        None
    }
}

/// Causal attention of a step's new queries, each sequence's over its own cached keys and
/// values.
pub trait Attention: Send + Sync {
    /// `q` is `[n, heads·head_dim]` for the tokens at `positions` (one per row); each of
    /// `sequences` names its rows of `q`, whose keys and values are already in its cache.
    /// Returns `[n, heads·head_dim]`.
    fn forward(
        &self,
        q: &Matrix,
        positions: &[usize],
        sequences: &[AttendSequence<'_>],
        options: AttendOptions,
    ) -> Matrix;
}

/// A whole attention sub-layer with its own projections and cache layout, for techniques that
/// do not split into q/k/v projections plus a kernel (multi-head latent attention).
pub trait AttentionBlock: Send + Sync {
    /// Attends the normalised input `h` (the tokens at `positions`) over layer `layer` of the
    /// sequence's cache, appending these tokens to it; returns the output projection's result.
    fn forward(
        &self,
        h: &Matrix,
        kv: &mut dyn SequenceKv,
        layer: usize,
        positions: &[usize],
        position: &dyn PositionEncoding,
    ) -> Matrix;

    /// Bytes of weights one decode step reads.
    fn weight_bytes(&self) -> usize;
}

pub trait Ffn: Send + Sync {
    fn forward(&self, x: &Matrix) -> Matrix;
    fn weight_bytes(&self) -> usize;
}

/// A KV-cache layout: makes the per-sequence store.
pub trait KvCache: Send + Sync {
    fn new_sequence(&self, config: &ModelConfig) -> Box<dyn SequenceKv>;
    /// Blocks in use and the pool's capacity, for a layout that draws from a bounded pool.
    fn usage(&self) -> Option<KvUsage> {
        None
    }
}

/// How a KV cache stores its elements: a KV-quantization scheme.
pub trait KvQuant: Send + Sync {
    fn dtype(&self) -> KvDtype;
}

/// How full a bounded KV pool is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KvUsage {
    pub blocks_in_use: usize,
    /// The most blocks in use at once so far.
    pub peak_blocks: usize,
    pub capacity: usize,
    pub block_tokens: usize,
}

/// A sequence's next tokens do not fit in the KV pool's free blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the KV pool cannot hold {tokens} more tokens: {needed} more blocks of {block} tokens are needed beside the {holding} this sequence holds, and {free} of the pool's {capacity} are free"
)]
pub struct KvFull {
    pub tokens: usize,
    pub needed: usize,
    pub holding: usize,
    pub free: usize,
    pub capacity: usize,
    pub block: usize,
    /// The sequence could not fit even with the whole pool to itself.
    pub never_fits: bool,
}

/// One sequence's cached keys and values, for every layer.
pub trait SequenceKv: Send + Sync {
    /// Makes room for the next `tokens` in every layer; a layout without a bound always can.
    fn reserve(&mut self, _tokens: &[u32]) -> Result<(), KvFull> {
        Ok(())
    }
    /// For an empty sequence about to take `tokens`: takes the cached keys and values of the
    /// longest prefix of them another sequence with the same `salt` computed (whole blocks,
    /// leaving at least the last token to run) and returns how many tokens that is; the
    /// sequence's own blocks are cached under `salt` too. Layouts without a prefix cache
    /// reuse nothing.
    fn reuse_prefix(&mut self, _tokens: &[u32], _salt: Option<&str>) -> usize {
        0
    }
    /// Forgets every token from position `tokens` on, in every layer (a rejected speculative
    /// draft); blocks no longer needed go back to the pool. `tokens` is at least the length
    /// at the last `reserve`: a layout may have given back what lies before a windowed
    /// layer's window of that point.
    fn truncate(&mut self, tokens: usize);
    /// A second sequence holding the same tokens, which then goes its own way (parallel
    /// samples of one prompt, beams): blocks are shared, and copied only when one of the two
    /// writes into a shared, partly filled block.
    fn fork(&self) -> Box<dyn SequenceKv>;
    /// Tokens cached in `layer`.
    fn len(&self, layer: usize) -> usize;
    /// `values` may have no columns: layouts that cache one latent per token store keys only.
    fn append(&mut self, layer: usize, keys: &Matrix, values: &Matrix);
    fn view(&self, layer: usize) -> KvView<'_>;
}

/// What a factory can read while binding an operator to a checkpoint.
pub struct BuildContext<'a> {
    pub config: &'a ModelConfig,
    pub weights: &'a Weights,
    /// The layer being built (0 for model-wide operators).
    pub layer: usize,
    /// The quantization plugin's scheme, when one is enabled.
    pub quantization: Option<&'a dyn Quantization>,
    /// The backend the model runs on: operators keep it, and upload their weights to it.
    pub backend: &'a Arc<dyn Backend>,
    /// How the KV cache stores keys and values (a KV-quantization plugin's choice).
    pub kv_dtype: KvDtype,
}

impl BuildContext<'_> {
    pub fn weight(&self, name: &str, shape: &[usize]) -> anyhow::Result<Weight> {
        Ok(self.weights.get(name, shape)?)
    }

    /// A 1-D tensor of `len` elements as f32 (norm weights, biases).
    pub fn vector(&self, name: &str, len: usize) -> anyhow::Result<Vec<f32>> {
        Ok(self.weight(name, &[len])?.to_f32_vec())
    }

    pub fn linear(&self, name: &str, out: usize, inp: usize) -> anyhow::Result<Box<dyn Linear>> {
        if let Some(scheme) = self.quantization {
            if let Some(linear) =
                scheme.stored_linear(self.backend.as_ref(), self.weights, name, out, inp)?
            {
                return Ok(linear);
            }
        }
        let weight = if self.config.layout.transposed {
            self.weight(name, &[inp, out])?.transposed()?
        } else {
            self.weight(name, &[out, inp])?
        };
        self.linear_over(name, weight)
    }

    /// One linear layer over the weights `names` (each `[outs[i], inp]`) stacked by rows, when
    /// the quantization scheme can stack them; `None` where they stay apart.
    pub fn stacked_linear(
        &self,
        names: &[&str],
        outs: &[usize],
        inp: usize,
    ) -> anyhow::Result<Option<Box<dyn Linear>>> {
        let Some(scheme) = self.quantization else {
            return Ok(None);
        };
        // Only plain `[out, in]` tensors stack: a layer stored in tensors of its own (AWQ's
        // `qweight`) has none under its name, and is not read here to find that out.
        if self.config.layout.transposed || !names.iter().all(|n| self.weights.contains(n)) {
            return Ok(None);
        }
        let weights = names
            .iter()
            .zip(outs)
            .map(|(name, &out)| self.weight(name, &[out, inp]))
            .collect::<anyhow::Result<Vec<_>>>()?;
        scheme.stacked_linear(self.backend.as_ref(), weights)
    }

    /// The linear layer over a weight already read (`name` is its checkpoint name).
    pub fn linear_over(&self, name: &str, weight: Weight) -> anyhow::Result<Box<dyn Linear>> {
        match self.quantization {
            Some(scheme) => scheme.linear(self.backend.as_ref(), name, weight),
            None if weight.dtype.is_quantized() => anyhow::bail!(
                "tensor `{name}` is stored as {}, and no quantization plugin is enabled",
                weight.dtype
            ),
            None => Ok(self.backend.linear(LinearWeight::Dense(weight))),
        }
    }
}

/// Makes one kind of operator. `check` says whether the technique fits a checkpoint, naming
/// the config field that disagrees when it does not.
pub trait Factory<T: ?Sized>: Send + Sync {
    fn check(&self, config: &ModelConfig) -> Result<(), String>;
    /// Binds the operator to the weights under `prefix` (empty for weightless operators), for
    /// rows of `dim` features where that applies (norms, biases).
    fn build(&self, cx: &BuildContext<'_>, prefix: &str, dim: usize) -> anyhow::Result<Box<T>>;
}

#[derive(Clone)]
pub enum Operator {
    Attention(Arc<dyn Factory<dyn Attention>>),
    /// Fills the attention slot with a whole sub-layer, built per layer.
    AttentionBlock(Arc<dyn Factory<dyn AttentionBlock>>),
    Position(Arc<dyn Factory<dyn PositionEncoding>>),
    Norm(Arc<dyn Factory<dyn Norm>>),
    Ffn(Arc<dyn Factory<dyn Ffn>>),
    KvCache(Arc<dyn Factory<dyn KvCache>>),
    Residual(Arc<dyn Factory<dyn Residual>>),
    QkvBias(Arc<dyn Factory<dyn Bias>>),
    QkNorm(Arc<dyn Factory<dyn Norm>>),
    AttentionWindow(Arc<dyn Factory<dyn AttentionWindow>>),
    Softcap(Arc<dyn Factory<dyn Softcap>>),
    Nope(Arc<dyn Factory<dyn NoPosition>>),
    Quantization(Arc<dyn Factory<dyn Quantization>>),
    KvQuant(Arc<dyn Factory<dyn KvQuant>>),
}

impl Operator {
    pub fn slot(&self) -> Slot {
        match self {
            Operator::Attention(_) | Operator::AttentionBlock(_) => Slot::Attention,
            Operator::Position(_) => Slot::Position,
            Operator::Norm(_) => Slot::Norm,
            Operator::Ffn(_) => Slot::Ffn,
            Operator::KvCache(_) => Slot::KvCache,
            Operator::Residual(_) => Slot::Residual,
            Operator::Softcap(_) => Slot::Softcap,
            Operator::Nope(_) => Slot::Nope,
            Operator::Quantization(_) => Slot::Quantization,
            Operator::QkvBias(_) => Slot::QkvBias,
            Operator::QkNorm(_) => Slot::QkNorm,
            Operator::AttentionWindow(_) => Slot::AttentionWindow,
            Operator::KvQuant(_) => Slot::KvQuant,
        }
    }

    pub fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match self {
            Operator::Attention(f) => f.check(config),
            Operator::AttentionBlock(f) => f.check(config),
            Operator::Position(f) => f.check(config),
            Operator::Norm(f) => f.check(config),
            Operator::Ffn(f) => f.check(config),
            Operator::KvCache(f) => f.check(config),
            Operator::Residual(f) => f.check(config),
            Operator::Softcap(f) => f.check(config),
            Operator::Nope(f) => f.check(config),
            Operator::Quantization(f) => f.check(config),
            Operator::QkvBias(f) => f.check(config),
            Operator::QkNorm(f) => f.check(config),
            Operator::AttentionWindow(f) => f.check(config),
            Operator::KvQuant(f) => f.check(config),
        }
    }
}

/// The operators registered by plugins, each tagged with its plugin's name; those of disabled
/// plugins stay registered but are not offered.
#[derive(Resource, Default, Clone)]
pub struct Operators {
    entries: Vec<(&'static str, Operator, bool)>,
}

impl Operators {
    pub fn register(&mut self, plugin: &'static str, operator: Operator) {
        self.entries.push((plugin, operator, true));
    }

    /// Whether `plugin` registered operators: it is part of the model, which is built once.
    pub fn has_plugin(&self, plugin: &str) -> bool {
        self.entries.iter().any(|(p, ..)| *p == plugin)
    }

    pub fn set_enabled(&mut self, plugin: &str, enabled: bool) {
        for entry in self.entries.iter_mut().filter(|(p, ..)| *p == plugin) {
            entry.2 = enabled;
        }
    }

    /// The enabled operator filling `slot`, with the name of the plugin that registered it.
    pub fn get(&self, slot: Slot) -> Option<(&'static str, &Operator)> {
        self.entries
            .iter()
            .find(|(_, op, enabled)| *enabled && op.slot() == slot)
            .map(|(p, op, _)| (*p, op))
    }
}
