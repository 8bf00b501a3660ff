//! The `Backend`: the small vocabulary of operations every operator is written in, so that a
//! backend can be added without touching a plugin. A model is built for one backend: weights
//! are uploaded to it when operators bind them (the backend chooses their layout), and every
//! operator keeps the backend it was built with.
//!
//! Activations are host [`Matrix`]es for now: the CPU backend works on them in place, and a
//! device backend moves them at each operation until device-resident activations exist.

pub mod cpu;
pub mod kv;
pub mod math;
pub mod quant;
pub mod tensor;

use std::ops::Range;
use std::sync::Arc;

use crate::io::weights::Weight;
use kv::{KvChunk, KvDtype};
use quant::packed::PackedMatrix;
use tensor::Matrix;

/// A linear layer uploaded to a backend.
pub trait Linear: Send + Sync {
    /// `x · Wᵀ`: `[n, in]` → `[n, out]`.
    fn forward(&self, x: &Matrix) -> Matrix;
    fn weight_bytes(&self) -> usize;
}

/// Per-call attention options beyond causality.
#[derive(Clone, Copy, Debug, Default)]
pub struct AttendOptions<'a> {
    /// `Some(w)`: a query at position `p` sees only positions `p + 1 - w ..= p`.
    pub window: Option<usize>,
    /// Scores pass through `c · tanh(score / c)`.
    pub softcap: Option<f32>,
    /// Scores of head `h` gain `alibi[h] · key_position`.
    pub alibi: Option<&'a [f32]>,
}

/// The keys and values of one layer as a list of chunks, each holding whole tokens of
/// `kv_heads·head_dim` elements: one chunk for a contiguous cache, one per block for a paged
/// one. Every chunk holds `dtype`. The chunks start at position `first`: a layout may give
/// back what no query can see any more (tokens out of every layer's window).
pub struct KvView<'a> {
    pub keys: Vec<KvChunk<'a>>,
    pub values: Vec<KvChunk<'a>>,
    /// Tokens cached, counting from position 0.
    pub tokens: usize,
    pub first: usize,
    pub dtype: KvDtype,
}

/// One sequence of a batched attention: which rows of the queries are its tokens, and its
/// cached keys and values (those tokens' own already written).
pub struct AttendSequence<'a> {
    pub rows: Range<usize>,
    pub kv: KvView<'a>,
}

/// The operations of the vocabulary, for [`Backend::supports`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Linear,
    Embed,
    RmsNorm,
    LayerNorm,
    Rotary,
    Attention,
    Activation,
    Gated,
    Add,
    Scale,
    Softcap,
    Softmax,
    TopK,
    GatherRows,
    ScatterRows,
    Custom,
}

/// Feed-forward activations, by the names `config.json`'s `hidden_act` gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Silu,
    Relu,
    /// The exact GELU, `x · Φ(x)`.
    GeluErf,
    /// GELU's tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    pub fn from_name(hidden_act: &str) -> Option<Self> {
        match hidden_act {
            "silu" | "swish" => Some(Activation::Silu),
            "relu" => Some(Activation::Relu),
            "gelu" => Some(Activation::GeluErf),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Activation::GeluTanh),
            _ => None,
        }
    }

    pub fn is_gelu(self) -> bool {
        matches!(self, Activation::GeluErf | Activation::GeluTanh)
    }

    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Silu => math::silu(x),
            Activation::Relu => x.max(0.0),
            Activation::GeluErf => math::gelu_erf(x),
            Activation::GeluTanh => math::gelu_tanh(x),
        }
    }
}

/// The gate and up projections' outputs of a gated feed-forward.
pub enum GateUp<'a> {
    Separate {
        gate: &'a Matrix,
        up: &'a Matrix,
    },
    /// One matrix whose rows hold the gate half, then the up half.
    Halves(&'a Matrix),
}

/// A weight handed to [`Backend::linear`].
pub enum LinearWeight {
    /// Stored as the checkpoint holds it (f32, f16, bf16, or GGUF blocks read as they are).
    Dense(Weight),
    /// Repacked by a quantization plugin into 32-element blocks.
    Packed(PackedMatrix),
}

/// Rotary position encoding of `heads` heads of `head_dim` features in each row: pair `i`
/// (`(i, i + half)`, or `(2i, 2i + 1)` interleaved) of the first `2 · inv_freq.len()`
/// features turns by `position · inv_freq[i]`, and is scaled by `magnitude`.
pub struct Rotary<'a> {
    pub heads: usize,
    pub head_dim: usize,
    pub inv_freq: &'a [f32],
    pub magnitude: f32,
    pub interleaved: bool,
}

/// The heads of causal attention: query head `h` reads key/value head `h / (heads / kv_heads)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies every score (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
    /// Keys per tile of an online softmax that never holds more scores than that; `None`
    /// scores all keys at once.
    pub tile: Option<usize>,
}

/// A backend: owns the memory its weights live in and runs the operations.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Whether the device runs `op`; one it does not is run on the CPU, and said so.
    fn supports(&self, op: Op) -> bool;
    /// Uploads a linear layer's weight `[out, in]`; the result computes `x · Wᵀ`.
    fn linear(&self, weight: LinearWeight) -> Box<dyn Linear>;
    /// Rows `tokens` of an embedding table, widened to f32.
    fn embed(&self, table: &Weight, tokens: &[u32]) -> Matrix;
    /// `x / sqrt(mean(x²) + eps) · gain`, row by row.
    fn rms_norm(&self, x: &Matrix, gain: &[f32], eps: f32) -> Matrix;
    /// `(x − mean) / sqrt(var + eps) · weight + bias`, row by row.
    fn layer_norm(&self, x: &Matrix, weight: &[f32], bias: Option<&[f32]>, eps: f32) -> Matrix;
    /// Rotates row `i` of `x` to `positions[i]`.
    fn rotary(&self, x: &mut Matrix, rotary: &Rotary<'_>, positions: &[usize]);
    /// Causal attention of `q` (`[n, heads·head_dim]`, the tokens at `positions`, one per
    /// row) for every sequence of a step at once, each sequence's rows over its own keys and
    /// values; returns `[n, heads·head_dim]`.
    fn attention(
        &self,
        q: &Matrix,
        positions: &[usize],
        sequences: &[AttendSequence<'_>],
        shape: &AttentionShape,
        options: AttendOptions<'_>,
    ) -> Matrix;
    fn activation(&self, x: &mut Matrix, act: Activation);
    /// `act(gate) · up`.
    fn gated(&self, input: GateUp<'_>, act: Activation) -> Matrix;
    /// `x += y`.
    fn add(&self, x: &mut Matrix, y: &Matrix);
    /// Adds `row` to every row of `x` (a bias).
    fn add_row(&self, x: &mut Matrix, row: &[f32]);
    fn scale(&self, x: &mut Matrix, factor: f32);
    /// `cap · tanh(x / cap)` on every element.
    fn softcap(&self, x: &mut Matrix, cap: f32);
    fn softmax_rows(&self, x: &mut Matrix);
    /// The indices of the `k` largest values of `row`, largest first; ties keep the lower index
    /// first.
    fn top_k(&self, row: &[f32], k: usize) -> Vec<usize>;
    fn gather_rows(&self, x: &Matrix, rows: &[usize]) -> Matrix;
    /// `out[rows[i]] += weights[i] · src[i]`.
    fn scatter_add_rows(&self, out: &mut Matrix, rows: &[usize], src: &Matrix, weights: &[f32]);
    /// A plugin's own kernel `name`, for an operation outside the vocabulary (MLA's absorbed
    /// attention): `cpu` writes chunk `index` (`chunk` floats) of `out`. A backend without a
    /// device version runs it on the host.
    fn custom(
        &self,
        name: &str,
        out: &mut Matrix,
        chunk: usize,
        cpu: &(dyn Fn(usize, &mut [f32]) + Sync),
    );
}

/// The backend every model is built for unless told otherwise.
pub fn default_backend() -> Arc<dyn Backend> {
    Arc::new(cpu::CpuBackend)
}

/// Reproducible values in [−0.5, 0.5) for the kernels' tests (a linear congruential generator).
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::Activation;

    #[test]
    fn activations_by_their_config_names() {
        let relu = Activation::from_name("relu").unwrap();
        assert_eq!((relu.apply(-2.0), relu.apply(3.0)), (0.0, 3.0));
        let silu = Activation::from_name("silu").unwrap();
        assert!((silu.apply(1.0) - 0.731_058_6).abs() < 1e-6);
        assert_eq!(
            Activation::from_name("gelu_new"),
            Some(Activation::GeluTanh)
        );
        assert_eq!(Activation::from_name("gelu"), Some(Activation::GeluErf));
        assert_eq!(Activation::from_name("swish7"), None);
    }
}
