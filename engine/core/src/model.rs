//! The model builder and the transformer forward pass composed from registered operators.

use anyhow::{bail, Context};

use crate::config::ModelConfig;
use crate::ops::{
    Attention, BuildContext, Ffn, KvCache, Linear, Norm, Operator, Operators, PositionEncoding,
    SequenceKv, Slot,
};
use crate::tensor::Matrix;
use crate::weights::{Weight, Weights};

struct Layer {
    attn_norm: Box<dyn Norm>,
    q_proj: Box<dyn Linear>,
    k_proj: Box<dyn Linear>,
    v_proj: Box<dyn Linear>,
    o_proj: Box<dyn Linear>,
    ffn_norm: Box<dyn Norm>,
    ffn: Box<dyn Ffn>,
}

pub struct Model {
    pub config: ModelConfig,
    /// The plugin chosen for each slot, for reports.
    pub chosen: Vec<(Slot, &'static str)>,
    embed: Weight,
    layers: Vec<Layer>,
    final_norm: Box<dyn Norm>,
    lm_head: Box<dyn Linear>,
    position: Box<dyn PositionEncoding>,
    attention: Box<dyn Attention>,
    kv_cache: Box<dyn KvCache>,
    weight_bytes: usize,
}

impl Model {
    pub fn build(
        config: ModelConfig,
        weights: &Weights,
        operators: &Operators,
    ) -> anyhow::Result<Self> {
        let mut chosen = Vec::new();
        for slot in Slot::ALL {
            let (plugin, op) = operators.get(slot).with_context(|| {
                let wanted = config
                    .required_plugins()
                    .into_iter()
                    .find(|(s, _)| *s == slot.name())
                    .map(|(_, p)| format!(" (this checkpoint needs `{p}`)"))
                    .unwrap_or_default();
                format!(
                    "the model needs a `{}` operator but no enabled plugin provides one{wanted}",
                    slot.name()
                )
            })?;
            if let Err(why) = op.check(&config) {
                bail!("plugin `{plugin}` does not fit this checkpoint: {why}");
            }
            chosen.push((slot, plugin));
        }
        let cx = BuildContext {
            config: &config,
            weights,
        };
        let op = |slot| operators.get(slot).expect("checked above").1.clone();
        let (
            Operator::Attention(attention),
            Operator::Position(position),
            Operator::Norm(norm),
            Operator::Ffn(ffn),
            Operator::KvCache(kv),
        ) = (
            op(Slot::Attention),
            op(Slot::Position),
            op(Slot::Norm),
            op(Slot::Ffn),
            op(Slot::KvCache),
        )
        else {
            unreachable!("Operators::get returns the operator of the slot asked for")
        };
        let (hidden, q_dim, kv_dim) = (config.hidden_size, config.q_dim(), config.kv_dim());
        let mut layers = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                attn_norm: norm.build(&cx, &format!("{p}.input_layernorm"))?,
                q_proj: cx.linear(&format!("{p}.self_attn.q_proj.weight"), q_dim, hidden)?,
                k_proj: cx.linear(&format!("{p}.self_attn.k_proj.weight"), kv_dim, hidden)?,
                v_proj: cx.linear(&format!("{p}.self_attn.v_proj.weight"), kv_dim, hidden)?,
                o_proj: cx.linear(&format!("{p}.self_attn.o_proj.weight"), hidden, q_dim)?,
                ffn_norm: norm.build(&cx, &format!("{p}.post_attention_layernorm"))?,
                ffn: ffn.build(&cx, &format!("{p}.mlp"))?,
            });
        }
        let embed = cx.weight("model.embed_tokens.weight", &[config.vocab_size, hidden])?;
        let lm_head: Box<dyn Linear> = if config.tie_word_embeddings {
            Box::new(crate::ops::DenseLinear(embed.clone()))
        } else {
            cx.linear("lm_head.weight", config.vocab_size, hidden)?
        };
        // A decode step streams every matmul weight once; of the embedding only one row.
        let weight_bytes = lm_head.weight_bytes()
            + layers
                .iter()
                .map(|l| {
                    [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj]
                        .iter()
                        .map(|p| p.weight_bytes())
                        .sum::<usize>()
                        + l.ffn.weight_bytes()
                })
                .sum::<usize>();
        Ok(Self {
            chosen,
            embed,
            layers,
            final_norm: norm.build(&cx, "model.norm")?,
            lm_head,
            position: position.build(&cx, "")?,
            attention: attention.build(&cx, "")?,
            kv_cache: kv.build(&cx, "")?,
            weight_bytes,
            config,
        })
    }

    pub fn new_sequence(&self) -> Box<dyn SequenceKv> {
        self.kv_cache.new_sequence(&self.config)
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
        let start = kv.len(0);
        if start + tokens.len() > cfg.context_length() {
            bail!(
                "sequence of {} tokens exceeds the model's context of {}",
                start + tokens.len(),
                cfg.context_length()
            );
        }
        let positions: Vec<usize> = (start..start + tokens.len()).collect();
        let mut x = Matrix::zeros(tokens.len(), cfg.hidden_size);
        for (row, &t) in x.rows_iter_mut().zip(tokens) {
            self.embed.row_to_f32(t as usize, row);
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x);
            let mut q = layer.q_proj.forward(&h);
            let mut k = layer.k_proj.forward(&h);
            let v = layer.v_proj.forward(&h);
            self.position.apply(&mut q, cfg.num_heads, &positions);
            self.position.apply(&mut k, cfg.num_kv_heads, &positions);
            kv.append(i, &k, &v);
            let attended = self.attention.forward(&q, &kv.view(i), &positions);
            x.add_assign(&layer.o_proj.forward(&attended));
            let h = layer.ffn_norm.forward(&x);
            x.add_assign(&layer.ffn.forward(&h));
        }
        if !all_logits {
            let last = x.row(x.rows - 1).to_vec();
            x = Matrix::from_vec(1, cfg.hidden_size, last);
        }
        Ok(self.lm_head.forward(&self.final_norm.forward(&x)))
    }
}
