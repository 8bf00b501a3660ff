//! v2300 `kv-cache`: one contiguous, growing buffer of keys and one of values per layer.

use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{BuildContext, Factory, KvCache, KvView, SequenceKv};
use vibee_core::Matrix;

pub struct ContiguousKvCache;

vibee_core::operator_plugin!(ContiguousKvCache, "v2300", "kv-cache", KvCache);

impl Factory<dyn KvCache> for ContiguousKvCache {
    fn check(&self, _config: &ModelConfig) -> Result<(), String> {
        Ok(())
    }

    fn build(
        &self,
        _cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn KvCache>> {
        Ok(Box::new(ContiguousKvCache))
    }
}

impl KvCache for ContiguousKvCache {
    fn new_sequence(&self, config: &ModelConfig) -> Box<dyn SequenceKv> {
        Box::new(ContiguousSequence {
            kv_dim: config.kv_dim(),
            layers: vec![(Vec::new(), Vec::new()); config.num_layers],
        })
    }
}

#[derive(Clone)]
struct ContiguousSequence {
    kv_dim: usize,
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl SequenceKv for ContiguousSequence {
    fn truncate(&mut self, tokens: usize) {
        for (k, v) in &mut self.layers {
            k.truncate(tokens * self.kv_dim);
            v.truncate(tokens * self.kv_dim);
        }
    }

    fn fork(&self) -> Box<dyn SequenceKv> {
        Box::new(self.clone())
    }

    fn len(&self, layer: usize) -> usize {
        self.layers[layer].0.len() / self.kv_dim
    }

    fn append(&mut self, layer: usize, keys: &Matrix, values: &Matrix) {
        debug_assert!(keys.cols == self.kv_dim && (values.cols == self.kv_dim || values.cols == 0));
        let (k, v) = &mut self.layers[layer];
        k.extend_from_slice(&keys.data);
        v.extend_from_slice(&values.data);
    }

    fn view(&self, layer: usize) -> KvView<'_> {
        let (k, v) = &self.layers[layer];
        KvView {
            keys: vec![k.as_slice()],
            values: vec![v.as_slice()],
            tokens: k.len() / self.kv_dim,
        }
    }
}
