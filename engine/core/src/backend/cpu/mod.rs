//! The CPU backend: the reference every other backend is checked against, and a real target
//! (mmap'd weights read in place, SIMD, integer kernels for quantized weights, a fork-join
//! pool for the decode hot path).

mod attention;
pub mod kernels;
pub mod pool;
pub(crate) mod product;

use rayon::prelude::*;

use super::math::{axpy, softcap, softmax};
use super::quant::packed::PackedLinear;
use super::tensor::Matrix;
use super::{Activation, AttentionShape, Backend, GateUp, LinearWeight, Op, Rotary};
use super::{AttendOptions, AttendSequence, Linear};
use crate::io::weights::Weight;

/// Rows per rayon task of row-wise operations: below this, splitting costs more than it saves.
const MIN_ROWS_PER_TASK: usize = 64;

pub struct CpuBackend;

/// A full-precision linear layer over a mapped weight.
struct DenseLinear(Weight);

impl Linear for DenseLinear {
    fn forward(&self, x: &Matrix) -> Matrix {
        kernels::linear(x, &self.0)
    }

    fn weight_bytes(&self) -> usize {
        self.0.bytes()
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn supports(&self, _op: Op) -> bool {
        true
    }

    fn linear(&self, weight: LinearWeight) -> Box<dyn Linear> {
        match weight {
            LinearWeight::Dense(weight) => {
                weight.populate();
                Box::new(DenseLinear(weight))
            }
            LinearWeight::Packed(packed) => Box::new(PackedLinear(packed)),
        }
    }

    fn embed(&self, table: &Weight, tokens: &[u32]) -> Matrix {
        let mut x = Matrix::zeros(tokens.len(), table.shape[1]);
        for (row, &t) in x.rows_iter_mut().zip(tokens) {
            table.row_to_f32(t as usize, row);
        }
        x
    }

    fn rms_norm(&self, x: &Matrix, gain: &[f32], eps: f32) -> Matrix {
        let mut out = x.clone();
        let rows = out.data.par_chunks_mut(x.cols);
        rows.with_min_len(MIN_ROWS_PER_TASK).for_each(|row| {
            let mean_square = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let inv = 1.0 / (mean_square + eps).sqrt();
            for (v, g) in row.iter_mut().zip(gain) {
                *v = g * (*v * inv);
            }
        });
        out
    }

    fn layer_norm(&self, x: &Matrix, weight: &[f32], bias: Option<&[f32]>, eps: f32) -> Matrix {
        let mut out = x.clone();
        let rows = out.data.par_chunks_mut(x.cols);
        rows.with_min_len(MIN_ROWS_PER_TASK).for_each(|row| {
            let n = row.len() as f32;
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            for (i, v) in row.iter_mut().enumerate() {
                *v = (*v - mean) * inv * weight[i] + bias.map_or(0.0, |b| b[i]);
            }
        });
        out
    }

    fn rotary(&self, x: &mut Matrix, rotary: &Rotary<'_>, positions: &[usize]) {
        let half = rotary.inv_freq.len();
        x.data
            .par_chunks_mut(x.cols)
            .zip(positions)
            .for_each(|(row, &pos)| {
                let (cos, sin): (Vec<f32>, Vec<f32>) = rotary
                    .inv_freq
                    .iter()
                    .map(|f| {
                        let angle = pos as f32 * f;
                        let m = rotary.magnitude;
                        (angle.cos() * m, angle.sin() * m)
                    })
                    .unzip();
                for head in row.chunks_exact_mut(rotary.head_dim).take(rotary.heads) {
                    for i in 0..half {
                        let (x, y) = if rotary.interleaved {
                            (2 * i, 2 * i + 1)
                        } else {
                            (i, i + half)
                        };
                        let (a, b) = (head[x], head[y]);
                        head[x] = a * cos[i] - b * sin[i];
                        head[y] = b * cos[i] + a * sin[i];
                    }
                }
            });
    }

    fn attention(
        &self,
        q: &Matrix,
        positions: &[usize],
        sequences: &[AttendSequence<'_>],
        shape: &AttentionShape,
        options: AttendOptions<'_>,
    ) -> Matrix {
        attention::attention(q, positions, sequences, shape, options)
    }

    fn activation(&self, x: &mut Matrix, act: Activation) {
        x.data.iter_mut().for_each(|v| *v = act.apply(*v));
    }

    fn gated(&self, input: GateUp<'_>, act: Activation) -> Matrix {
        match input {
            GateUp::Separate { gate, up } => {
                let mut gated = gate.clone();
                for (g, u) in gated.data.iter_mut().zip(&up.data) {
                    *g = act.apply(*g) * u;
                }
                gated
            }
            GateUp::Halves(both) => {
                let width = both.cols / 2;
                let mut gated = Matrix::zeros(both.rows, width);
                for (out, row) in gated.rows_iter_mut().zip(both.rows_iter()) {
                    let (gate, up) = row.split_at(width);
                    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                        *o = act.apply(*g) * u;
                    }
                }
                gated
            }
        }
    }

    fn add(&self, x: &mut Matrix, y: &Matrix) {
        x.add_assign(y);
    }

    fn add_row(&self, x: &mut Matrix, row: &[f32]) {
        for r in x.rows_iter_mut() {
            r.iter_mut().zip(row).for_each(|(v, b)| *v += b);
        }
    }

    fn scale(&self, x: &mut Matrix, factor: f32) {
        x.data.iter_mut().for_each(|v| *v *= factor);
    }

    fn softcap(&self, x: &mut Matrix, cap: f32) {
        x.data.iter_mut().for_each(|v| *v = softcap(*v, cap));
    }

    fn softmax_rows(&self, x: &mut Matrix) {
        x.rows_iter_mut().for_each(softmax);
    }

    fn top_k(&self, row: &[f32], k: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        order.truncate(k);
        order
    }

    fn gather_rows(&self, x: &Matrix, rows: &[usize]) -> Matrix {
        let mut out = Matrix::zeros(rows.len(), x.cols);
        for (dst, &r) in out.rows_iter_mut().zip(rows) {
            dst.copy_from_slice(x.row(r));
        }
        out
    }

    fn scatter_add_rows(&self, out: &mut Matrix, rows: &[usize], src: &Matrix, weights: &[f32]) {
        for ((&r, row), &w) in rows.iter().zip(src.rows_iter()).zip(weights) {
            axpy(w, row, out.row_mut(r));
        }
    }

    fn custom(
        &self,
        _name: &str,
        out: &mut Matrix,
        chunk: usize,
        cpu: &(dyn Fn(usize, &mut [f32]) + Sync),
    ) {
        pool::pool().for_each_chunk(&mut out.data, chunk, cpu);
    }
}
