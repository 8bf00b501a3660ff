//! Causal scaled-dot-product attention, shared by `mha`, `mqa`, `gqa` and `flash-attention`.
//! The first three differ only in how many query heads share one key/value head and
//! materialise each query's scores; `flash-attention` walks the keys in tiles with an online
//! softmax instead, holding one tile of scores at a time. The backend runs the kernel.

use std::sync::Arc;

use vibee_core::backend::{AttentionShape, Backend};
use vibee_core::model::ops::{AttendOptions, AttendSequence, Attention, BuildContext};
use vibee_core::Matrix;

pub struct CausalAttention {
    shape: AttentionShape,
    backend: Arc<dyn Backend>,
}

impl CausalAttention {
    pub fn new(cx: &BuildContext<'_>) -> Self {
        let config = cx.config;
        Self {
            shape: AttentionShape {
                heads: config.num_heads,
                kv_heads: config.num_kv_heads,
                head_dim: config.head_dim,
                // Gemma 2 scales queries by its own `query_pre_attn_scalar` rather than head_dim.
                scale: 1.0
                    / config
                        .query_pre_attn_scalar
                        .unwrap_or(config.head_dim as f64)
                        .sqrt() as f32,
                tile: None,
            },
            backend: cx.backend.clone(),
        }
    }

    /// The tiled, online-softmax variant: never holds more than `tile` scores per query.
    pub fn tiled(mut self, tile: usize) -> Self {
        self.shape.tile = Some(tile.max(1));
        self
    }
}

impl Attention for CausalAttention {
    fn forward(
        &self,
        q: &Matrix,
        positions: &[usize],
        sequences: &[AttendSequence<'_>],
        options: AttendOptions<'_>,
    ) -> Matrix {
        self.backend
            .attention(q, positions, sequences, &self.shape, options)
    }
}
