//! The model builder and the transformer forward pass composed from registered operators.

pub mod checkpoint;
pub mod ops;

use std::sync::Arc;

use anyhow::{bail, Context};

use crate::backend::kv::KvDtype;
use crate::backend::tensor::Matrix;
use crate::backend::Backend;
use crate::config::{ModelConfig, NormSite, QkNormScope, QkvLayout};
use crate::io::weights::{Weight, Weights};
use crate::model::ops::{
    AttendOptions, AttendSequence, Attention, AttentionBlock, AttentionWindow, Bias, BuildContext,
    Ffn, KvCache, Linear, NoPosition, Norm, Operator, Operators, PositionEncoding, Residual,
    SequenceKv, Slot, Softcap,
};

/// A projection with its optional bias.
struct Projection {
    linear: Box<dyn Linear>,
    bias: Option<Box<dyn Bias>>,
}

impl Projection {
    fn forward(&self, x: &Matrix) -> Matrix {
        let mut out = self.linear.forward(x);
        if let Some(bias) = &self.bias {
            bias.apply(&mut out);
        }
        out
    }
}

struct Layer {
    /// The norms of the residual arrangement, by site.
    norms: Vec<(NormSite, Box<dyn Norm>)>,
    attention: LayerAttention,
    ffn: Box<dyn Ffn>,
}

enum LayerAttention {
    /// q/k/v projections, the attention kernel, and the output projection.
    Projected {
        /// One projection per entry: q, k, v separately, or one fused.
        qkv: Vec<Projection>,
        qk_norm: Option<(Box<dyn Norm>, Box<dyn Norm>)>,
        o_proj: Projection,
    },
    /// A plugin's whole attention sub-layer.
    Block(Box<dyn AttentionBlock>),
}

impl LayerAttention {
    fn weight_bytes(&self) -> usize {
        match self {
            LayerAttention::Projected { qkv, o_proj, .. } => qkv
                .iter()
                .chain([o_proj])
                .map(|p| p.linear.weight_bytes())
                .sum(),
            LayerAttention::Block(block) => block.weight_bytes(),
        }
    }
}

impl Layer {
    fn norm(&self, site: NormSite, x: &Matrix) -> Matrix {
        let (_, norm) = self
            .norms
            .iter()
            .find(|(s, _)| *s == site)
            .expect("the residual's sites are built");
        norm.forward(x)
    }
}

pub struct Model {
    pub config: ModelConfig,
    /// The plugin chosen for each slot the model uses, for reports.
    pub chosen: Vec<(Slot, &'static str)>,
    embed: Weight,
    layers: Vec<Layer>,
    final_norm: Box<dyn Norm>,
    embed_norm: Option<Box<dyn Norm>>,
    lm_head: Box<dyn Linear>,
    position: Box<dyn PositionEncoding>,
    /// The attention kernel of projected layers (absent when a block fills the slot).
    attention: Option<Box<dyn Attention>>,
    residual: Box<dyn Residual>,
    window: Option<Box<dyn AttentionWindow>>,
    softcap: Option<Box<dyn Softcap>>,
    nope: Option<Box<dyn NoPosition>>,
    kv_cache: Box<dyn KvCache>,
    weight_bytes: usize,
    backend: Arc<dyn Backend>,
}

/// Picks the operator for every slot: each slot the checkpoint needs must be filled by an
/// enabled plugin that fits it, and an enabled plugin for a technique the checkpoint does not
/// use is an error naming the config field that disagrees.
fn choose(
    config: &ModelConfig,
    operators: &Operators,
) -> anyhow::Result<Vec<(Slot, &'static str, Operator)>> {
    let needed = config.required_plugins();
    let mut chosen = Vec::new();
    for slot in Slot::ALL {
        let wanted = needed
            .iter()
            .find(|(s, _)| *s == slot.name())
            .map(|(_, p)| *p);
        match (operators.get(slot), wanted) {
            (Some((plugin, op)), _) => {
                if let Err(why) = op.check(config) {
                    bail!("plugin `{plugin}` does not fit this checkpoint: {why}");
                }
                chosen.push((slot, plugin, op.clone()));
            }
            (None, Some(p)) => bail!(
                "the model needs a `{}` operator but no enabled plugin provides one (this checkpoint needs `{p}`)",
                slot.name()
            ),
            (None, None) if slot == Slot::KvCache => {
                bail!("the model needs a `kv-cache` operator but no enabled plugin provides one")
            }
            (None, None) => {}
        }
    }
    Ok(chosen)
}

macro_rules! operator {
    ($chosen:expr, $variant:ident) => {
        $chosen.iter().find_map(|(_, _, op)| match op {
            Operator::$variant(f) => Some(f.clone()),
            _ => None,
        })
    };
}

impl Model {
    /// Binds the operators chosen for `config` to `weights`, on `backend`.
    pub fn build(
        config: ModelConfig,
        weights: &Weights,
        operators: &Operators,
        backend: Arc<dyn Backend>,
    ) -> anyhow::Result<Self> {
        let chosen = choose(&config, operators)?;
        // Sizes come from the config, which may claim anything: check them against the
        // checkpoint's tensors before allocating anything they size.
        let layout = config.layout;
        let hidden = config.hidden_size;
        let embed_name = format!("{}.weight", layout.embed);
        let embed = weights.get(&embed_name, &[config.vocab_size, hidden])?;
        if let Some(last) = config.num_layers.checked_sub(1) {
            let prefix = format!("{}.{last}.", layout.layers);
            if !weights.has_prefix(&prefix) {
                bail!(
                    "the config gives {} layers, but the checkpoint holds no tensor of layer \
                     {last} (`{prefix}*`): does the config belong to these weights?",
                    config.num_layers
                );
            }
        }
        let quantization = operator!(chosen, Quantization)
            .map(|q| {
                q.build(
                    &BuildContext {
                        config: &config,
                        weights,
                        layer: 0,
                        quantization: None,
                        backend: &backend,
                        kv_dtype: KvDtype::F32,
                    },
                    "",
                    0,
                )
            })
            .transpose()?;
        let mut cx = BuildContext {
            config: &config,
            weights,
            layer: 0,
            quantization: quantization.as_deref(),
            backend: &backend,
            kv_dtype: KvDtype::F32,
        };
        if let Some(kv_quant) = operator!(chosen, KvQuant) {
            cx.kv_dtype = kv_quant.build(&cx, "", 0)?.dtype();
        }
        let required = "checked by choose";
        let kernel = operator!(chosen, Attention);
        let block = operator!(chosen, AttentionBlock);
        let position = operator!(chosen, Position).context(required)?;
        let norm = operator!(chosen, Norm).context(required)?;
        let ffn = operator!(chosen, Ffn).context(required)?;
        let kv = operator!(chosen, KvCache).context(required)?;
        let residual =
            operator!(chosen, Residual)
                .context(required)?
                .build(&cx, "", config.hidden_size)?;
        let softcap = operator!(chosen, Softcap);
        let nope = operator!(chosen, Nope);
        let bias = operator!(chosen, QkvBias);
        let qk_norm = operator!(chosen, QkNorm);
        let window = operator!(chosen, AttentionWindow);
        let (q_dim, kv_dim) = (config.q_dim(), config.kv_dim());
        let projection =
            |name: &str, out: usize, inp: usize, biased: bool| -> anyhow::Result<Projection> {
                let bias = match (&bias, biased) {
                    (Some(b), true) => Some(b.build(&cx, name, out)?),
                    _ => None,
                };
                Ok(Projection {
                    linear: cx.linear(&format!("{name}.weight"), out, inp)?,
                    bias,
                })
            };
        let (qkv_bias, o_bias) = (config.qkv_bias, config.o_bias);
        let (q_norm_dim, k_norm_dim) = match config.qk_norm {
            Some(QkNormScope::Whole) => (q_dim, kv_dim),
            _ => (config.head_dim, config.head_dim),
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("{}.{i}", layout.layers);
            let a = format!("{p}.{}", layout.attention);
            let qk_norm = match &qk_norm {
                Some(f) => Some((
                    f.build(&cx, &format!("{a}.q_norm"), q_norm_dim)?,
                    f.build(&cx, &format!("{a}.k_norm"), k_norm_dim)?,
                )),
                None => None,
            };
            let mut norms = Vec::new();
            for &site in residual.sites() {
                let name = config.norm_tensor(site).with_context(|| {
                    format!("model_type {} has no norm at {site:?}", config.model_type)
                })?;
                norms.push((site, norm.build(&cx, &format!("{p}.{name}"), hidden)?));
            }
            let attention = match &block {
                Some(b) => {
                    LayerAttention::Block(b.build(&BuildContext { layer: i, ..cx }, &a, hidden)?)
                }
                None => LayerAttention::Projected {
                    qkv: match layout.qkv {
                        QkvLayout::Separate => {
                            let [q, k, v] =
                                ["q_proj", "k_proj", "v_proj"].map(|n| format!("{a}.{n}.weight"));
                            // Unbiased q, k and v packed alike run as one product.
                            let stacked = match qkv_bias {
                                true => None,
                                false => cx.stacked_linear(
                                    &[&q, &k, &v],
                                    &[q_dim, kv_dim, kv_dim],
                                    hidden,
                                )?,
                            };
                            match stacked {
                                Some(linear) => vec![Projection { linear, bias: None }],
                                None => vec![
                                    projection(&format!("{a}.q_proj"), q_dim, hidden, qkv_bias)?,
                                    projection(&format!("{a}.k_proj"), kv_dim, hidden, qkv_bias)?,
                                    projection(&format!("{a}.v_proj"), kv_dim, hidden, qkv_bias)?,
                                ],
                            }
                        }
                        QkvLayout::Fused(name) | QkvLayout::Concat(name) => {
                            vec![projection(
                                &format!("{a}.{name}"),
                                q_dim + 2 * kv_dim,
                                hidden,
                                qkv_bias,
                            )?]
                        }
                    },
                    qk_norm,
                    o_proj: projection(&format!("{a}.{}", layout.o_proj), hidden, q_dim, o_bias)?,
                },
            };
            layers.push(Layer {
                norms,
                attention,
                ffn: ffn.build(
                    &BuildContext { layer: i, ..cx },
                    &format!("{p}.mlp"),
                    hidden,
                )?,
            });
        }
        let lm_head: Box<dyn Linear> = if config.tie_word_embeddings {
            cx.linear_over(&embed_name, embed.clone())?
        } else {
            cx.linear(
                &format!("{}.weight", layout.lm_head),
                config.vocab_size,
                hidden,
            )?
        };
        // A decode step streams every matmul weight once; of the embedding only one row.
        let weight_bytes = lm_head.weight_bytes()
            + layers
                .iter()
                .map(|l| l.attention.weight_bytes() + l.ffn.weight_bytes())
                .sum::<usize>();
        Ok(Self {
            chosen: chosen
                .iter()
                .map(|(slot, plugin, _)| (*slot, *plugin))
                .collect(),
            embed,
            layers,
            final_norm: norm.build(&cx, layout.final_norm, hidden)?,
            embed_norm: layout
                .embed_norm
                .map(|name| norm.build(&cx, name, hidden))
                .transpose()?,
            lm_head,
            position: position.build(&cx, "", config.head_dim)?,
            attention: kernel
                .map(|k| k.build(&cx, "", config.head_dim))
                .transpose()?,
            residual,
            window: window.map(|w| w.build(&cx, "", 0)).transpose()?,
            softcap: softcap.map(|s| s.build(&cx, "", 0)).transpose()?,
            nope: nope.map(|n| n.build(&cx, "", 0)).transpose()?,
            kv_cache: kv.build(&cx, "", 0)?,
            weight_bytes,
            config,
            backend,
        })
    }

    pub fn new_sequence(&self) -> Box<dyn SequenceKv> {
        self.kv_cache.new_sequence(&self.config)
    }

    /// How full the KV pool is, for a layout with a bounded one.
    pub fn kv_usage(&self) -> Option<crate::model::ops::KvUsage> {
        self.kv_cache.usage()
    }

    /// Bytes of weights a decode step streams from memory (norm weights are noise).
    pub fn weight_bytes_per_token(&self) -> usize {
        self.weight_bytes
    }

    /// Runs `tokens` (the next tokens of the sequence whose cache is `kv`) through the model.
    /// Returns logits for every token when `all_logits`, else for the last one only.
    pub fn forward(
        &self,
        tokens: &[u32],
        kv: &mut dyn SequenceKv,
        all_logits: bool,
    ) -> anyhow::Result<Matrix> {
        let logits = if all_logits {
            Wanted::All
        } else {
            Wanted::Last
        };
        let mut batch = [BatchEntry { tokens, kv, logits }];
        let mut out = self.forward_batch(&mut batch)?;
        Ok(out.pop().expect("one sequence in, one out"))
    }

    /// Whether `tokens` can follow the `cached` tokens of a sequence: known token ids, and room
    /// in the model's context.
    pub fn check_feed(&self, tokens: &[u32], cached: usize) -> anyhow::Result<()> {
        let cfg = &self.config;
        if tokens.is_empty() {
            bail!("forward needs at least one token");
        }
        if let Some(bad) = tokens.iter().find(|t| **t as usize >= cfg.vocab_size) {
            bail!(
                "token id {bad} is outside the vocabulary (size {})",
                cfg.vocab_size
            );
        }
        if cached + tokens.len() > cfg.context_length() {
            bail!(
                "sequence of {} tokens exceeds the model's context of {}",
                cached + tokens.len(),
                cfg.context_length()
            );
        }
        Ok(())
    }

    /// One forward over every sequence of `batch`: their rows share each product and
    /// each attends over its own cache, which gains their keys and values. Returns each
    /// sequence's logits, with the rows it wants (none for [`Wanted::None`]).
    pub fn forward_batch(&self, batch: &mut [BatchEntry<'_>]) -> anyhow::Result<Vec<Matrix>> {
        let cfg = &self.config;
        let batch_len = batch.len();
        for (i, entry) in batch.iter_mut().enumerate() {
            let which = || match batch_len {
                1 => String::new(),
                _ => format!("sequence {i} of the batch"),
            };
            self.check_feed(entry.tokens, entry.kv.len(0))
                .with_context(which)?;
            entry.kv.reserve(entry.tokens).with_context(which)?;
        }
        // Sequence `s` owns rows `spans[s]` of every activation matrix.
        let mut spans = Vec::with_capacity(batch.len());
        let mut positions = Vec::new();
        for entry in batch.iter() {
            let start = entry.kv.len(0);
            spans.push(positions.len()..positions.len() + entry.tokens.len());
            positions.extend(start..start + entry.tokens.len());
        }
        let tokens: Vec<u32> = batch.iter().flat_map(|e| e.tokens).copied().collect();
        let mut x = self.backend.embed(&self.embed, &tokens);
        if let Some(scale) = cfg.embedding_scale {
            self.backend.scale(&mut x, scale);
        }
        per_sequence(&mut x, &spans, &positions, |m, at| {
            self.position.embed(m, at)
        });
        if let Some(norm) = &self.embed_norm {
            x = norm.forward(&x);
        }
        let attention_cap = self.softcap.as_ref().and_then(|s| s.attention());
        for (i, layer) in self.layers.iter().enumerate() {
            let options = AttendOptions {
                window: self.window.as_ref().and_then(|w| w.window(i)),
                softcap: attention_cap,
                alibi: self.position.alibi_slopes(),
            };
            let mut attention = |h: &Matrix| match &layer.attention {
                LayerAttention::Block(block) => {
                    let parts = batch.iter_mut().zip(&spans).map(|(entry, span)| {
                        let rows = h.rows_range(span.clone());
                        let at = &positions[span.clone()];
                        block.forward(&rows, &mut *entry.kv, i, at, self.position.as_ref())
                    });
                    Matrix::stack(parts.collect(), cfg.hidden_size)
                }
                LayerAttention::Projected {
                    qkv,
                    qk_norm,
                    o_proj,
                } => {
                    let (mut q, mut k, v) = match qkv.as_slice() {
                        [q, k, v] => (q.forward(h), k.forward(h), v.forward(h)),
                        [fused] => split_qkv(&fused.forward(h), cfg),
                        _ => unreachable!("built with one or three projections"),
                    };
                    if let Some((q_norm, k_norm)) = qk_norm {
                        q = per_head(q_norm.as_ref(), q);
                        k = per_head(k_norm.as_ref(), k);
                    }
                    if !self.nope.as_ref().is_some_and(|n| n.skips(i)) {
                        per_sequence(&mut q, &spans, &positions, |m, at| {
                            self.position.apply(m, cfg.num_heads, at)
                        });
                        per_sequence(&mut k, &spans, &positions, |m, at| {
                            self.position.apply(m, cfg.num_kv_heads, at)
                        });
                    }
                    let kernel = self
                        .attention
                        .as_ref()
                        .expect("projected layers have a kernel");
                    for (entry, span) in batch.iter_mut().zip(&spans) {
                        let (keys, values) =
                            (k.rows_range(span.clone()), v.rows_range(span.clone()));
                        entry.kv.append(i, &keys, &values);
                    }
                    let sequences: Vec<AttendSequence<'_>> = batch
                        .iter()
                        .zip(&spans)
                        .map(|(entry, span)| AttendSequence {
                            rows: span.clone(),
                            kv: entry.kv.view(i),
                        })
                        .collect();
                    o_proj.forward(&kernel.forward(&q, &positions, &sequences, options))
                }
            };
            self.residual.layer(
                &mut x,
                &|site, m| layer.norm(site, m),
                &mut attention,
                &|h| layer.ffn.forward(h),
            );
        }
        // Only the rows whose logits are wanted reach the output layer.
        let wanted: Vec<std::ops::Range<usize>> = batch
            .iter()
            .zip(&spans)
            .map(|(entry, span)| match entry.logits {
                Wanted::All => span.clone(),
                Wanted::Last => span.end - 1..span.end,
                Wanted::None => span.end..span.end,
            })
            .collect();
        if wanted.iter().all(|r| r.is_empty()) {
            return Ok(vec![Matrix::zeros(0, cfg.vocab_size); batch.len()]);
        }
        let rows = wanted.iter().map(|r| x.rows_range(r.clone())).collect();
        let mut logits = self.lm_head.forward(
            &self
                .final_norm
                .forward(&Matrix::stack(rows, cfg.hidden_size)),
        );
        if let Some(cap) = self.softcap.as_ref().and_then(|s| s.logits()) {
            self.backend.softcap(&mut logits, cap);
        }
        let mut first = 0;
        Ok(wanted
            .iter()
            .map(|r| {
                let out = logits.rows_range(first..first + r.len());
                first += r.len();
                out
            })
            .collect())
    }
}

/// Runs `encode` over each sequence's rows of `x` with its positions: position encodings may
/// depend on how long the sequence is (dynamic NTK, LongRoPE), never on its batch-mates.
fn per_sequence(
    x: &mut Matrix,
    spans: &[std::ops::Range<usize>],
    positions: &[usize],
    mut encode: impl FnMut(&mut Matrix, &[usize]),
) {
    if let [_] = spans {
        return encode(x, positions);
    }
    for span in spans {
        let mut rows = x.rows_range(span.clone());
        encode(&mut rows, &positions[span.clone()]);
        x.data[span.start * x.cols..span.end * x.cols].copy_from_slice(&rows.data);
    }
}

/// Which logits a sequence of a batch wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wanted {
    /// The next-token logits: the last row's.
    Last,
    /// Every row's (scoring a prompt, verifying a draft).
    All,
    /// None (a prefill chunk that is not the prompt's last).
    None,
}

/// One sequence's share of a batch, as llama.cpp's `llama_batch` holds it: its next tokens
/// (at the positions after those its cache holds), its cache, the logits it wants.
pub struct BatchEntry<'a> {
    pub tokens: &'a [u32],
    pub kv: &'a mut dyn SequenceKv,
    pub logits: Wanted,
}

/// Splits one q/k/v projection's output into its parts: interleaved per key/value head for
/// [`QkvLayout::Fused`], else q, k and v side by side ([`QkvLayout::Concat`], or separate
/// projections stacked into one product).
fn split_qkv(fused: &Matrix, cfg: &ModelConfig) -> (Matrix, Matrix, Matrix) {
    let (hd, n) = (cfg.head_dim, fused.rows);
    let mut q = Matrix::zeros(n, cfg.q_dim());
    let mut k = Matrix::zeros(n, cfg.kv_dim());
    let mut v = Matrix::zeros(n, cfg.kv_dim());
    if !matches!(cfg.layout.qkv, QkvLayout::Fused(_)) {
        let (qd, kd) = (cfg.q_dim(), cfg.kv_dim());
        for r in 0..n {
            let row = fused.row(r);
            q.row_mut(r).copy_from_slice(&row[..qd]);
            k.row_mut(r).copy_from_slice(&row[qd..qd + kd]);
            v.row_mut(r).copy_from_slice(&row[qd + kd..]);
        }
        return (q, k, v);
    }
    let group = cfg.num_heads / cfg.num_kv_heads;
    let stride = (group + 2) * hd;
    for r in 0..n {
        let row = fused.row(r);
        for g in 0..cfg.num_kv_heads {
            let block = &row[g * stride..(g + 1) * stride];
            let (qs, rest) = block.split_at(group * hd);
            q.row_mut(r)[g * group * hd..(g + 1) * group * hd].copy_from_slice(qs);
            k.row_mut(r)[g * hd..(g + 1) * hd].copy_from_slice(&rest[..hd]);
            v.row_mut(r)[g * hd..(g + 1) * hd].copy_from_slice(&rest[hd..]);
        }
    }
    (q, k, v)
}

/// Applies `norm` to every `norm.dim()` features of each row: each head for a per-head norm,
/// the whole row for a norm over the full projection.
fn per_head(norm: &dyn Norm, x: Matrix) -> Matrix {
    let (rows, cols, dim) = (x.rows, x.cols, norm.dim());
    let heads = Matrix::from_vec(rows * cols / dim, dim, x.data);
    let normed = norm.forward(&heads);
    Matrix::from_vec(rows, cols, normed.data)
}
