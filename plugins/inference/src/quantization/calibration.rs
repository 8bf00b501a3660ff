//! Calibration for AWQ and GPTQ: the full-precision model runs calibration text while every
//! projection of its decoder layers records statistics of its inputs — `H = Σ xᵀx` (the
//! layer's proxy Hessian, which both methods' losses are quadratic forms in) and `Σ |x|` per
//! input feature (AWQ's activation magnitudes). Projections fed the same input (q/k/v,
//! gate/up) share one record. Every layer's inputs come from the full-precision layers before
//! it; windows of layers whose statistics fit in memory record one pass at a time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use vibee_core::backend::tensor::Matrix;
use vibee_core::backend::{Backend, LinearWeight};
use vibee_core::io::weights::Weight;
use vibee_core::model::ops::{Linear, Quantization};

/// What the inputs of one projection (or of projections sharing an input) looked like.
pub struct InputStats {
    /// `Σ xᵀx` over calibration rows, `[in, in]`.
    pub hessian: Mat<f32>,
    /// `Σ |x|` per input feature.
    pub magnitude: Vec<f64>,
    pub rows: usize,
}

impl InputStats {
    fn new(features: usize) -> Self {
        Self {
            hessian: Mat::zeros(features, features),
            magnitude: vec![0.0; features],
            rows: 0,
        }
    }

    fn add(&mut self, x: &Matrix) {
        let x = MatRef::from_row_major_slice(&x.data, x.rows, x.cols);
        matmul(
            self.hessian.as_mut(),
            Accum::Add,
            x.transpose(),
            x,
            1.0,
            Par::rayon(0),
        );
        for row in x.row_iter() {
            for (m, v) in self.magnitude.iter_mut().zip(row.iter()) {
                *m += v.abs() as f64;
            }
        }
        self.rows += x.nrows();
    }

    /// Mean `|x|` per input feature.
    pub fn mean_magnitude(&self) -> Vec<f32> {
        let rows = self.rows.max(1) as f64;
        self.magnitude.iter().map(|m| (m / rows) as f32).collect()
    }
}

type Shared = Arc<Mutex<InputStats>>;

#[derive(Default)]
struct Records {
    /// By projection (`.weight` name), and whether this projection accumulates it (the first
    /// of the projections sharing the input) or only reads it.
    by_name: HashMap<String, (Shared, bool)>,
    /// The input the last recording projection saw, by fingerprint.
    last: Option<(u64, Shared)>,
    /// Every linear layer the model built: `.weight` name and `[out, in]`.
    built: Vec<(String, Vec<usize>)>,
    /// The projections that record (all when `None`).
    only: Option<HashSet<String>>,
}

/// The recording quantization scheme: dense layers that record their inputs.
#[derive(Clone, Default)]
pub struct Recorder {
    records: Arc<Mutex<Records>>,
}

impl Recorder {
    /// Drops what was recorded; from now on only the projections `names` record.
    pub fn restrict(&self, names: HashSet<String>) {
        let mut records = self.records.lock().expect("no recording panicked");
        records.by_name.clear();
        records.last = None;
        records.only = Some(names);
    }

    /// Every linear layer the model built, in order: `.weight` name and `[out, in]`.
    pub fn layers(&self) -> Vec<(String, Vec<usize>)> {
        self.records
            .lock()
            .expect("no recording panicked")
            .built
            .clone()
    }

    /// The statistics of each recorded projection, by `.weight` name.
    pub fn stats(&self) -> HashMap<String, Shared> {
        let records = self.records.lock().expect("no recording panicked");
        records
            .by_name
            .iter()
            .map(|(name, (stats, _))| (name.clone(), stats.clone()))
            .collect()
    }

    fn record(&self, name: &str, x: &Matrix) {
        let mut records = self.records.lock().expect("no recording panicked");
        if records
            .only
            .as_ref()
            .is_some_and(|only| !only.contains(name))
        {
            return;
        }
        let fingerprint = fingerprint(x);
        let (stats, owner) = match records.by_name.get(name) {
            Some((stats, owner)) => (stats.clone(), *owner),
            None => {
                let shared = match &records.last {
                    Some((last, stats)) if *last == fingerprint => Some(stats.clone()),
                    _ => None,
                };
                let entry = match shared {
                    Some(stats) => (stats, false),
                    None => (Arc::new(Mutex::new(InputStats::new(x.cols))), true),
                };
                records.by_name.insert(name.to_string(), entry.clone());
                entry
            }
        };
        if owner {
            stats.lock().expect("no recording panicked").add(x);
            records.last = Some((fingerprint, stats));
        }
    }
}

/// FNV-1a over the bits of a matrix: recognises the same input passed to sibling projections.
fn fingerprint(x: &Matrix) -> u64 {
    x.data.iter().fold(0xcbf2_9ce4_8422_2325, |h, v| {
        (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3)
    })
}

impl Quantization for Recorder {
    fn linear(
        &self,
        backend: &dyn Backend,
        name: &str,
        weight: Weight,
    ) -> anyhow::Result<Box<dyn Linear>> {
        self.records
            .lock()
            .expect("no recording panicked")
            .built
            .push((name.to_string(), weight.shape.clone()));
        Ok(Box::new(Recording {
            name: name.to_string(),
            dense: backend.linear(LinearWeight::Dense(weight)),
            recorder: self.clone(),
        }))
    }
}

struct Recording {
    name: String,
    dense: Box<dyn Linear>,
    recorder: Recorder,
}

impl Linear for Recording {
    fn forward(&self, x: &Matrix) -> Matrix {
        self.recorder.record(&self.name, x);
        self.dense.forward(x)
    }

    fn weight_bytes(&self) -> usize {
        self.dense.weight_bytes()
    }
}
