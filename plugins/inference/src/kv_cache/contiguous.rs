//! v2300 `kv-cache`: one contiguous, growing buffer of keys and one of values per layer.

use vibee_core::backend::kv::{KvDtype, KvShape, KvStore};
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
        cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn KvCache>> {
        Ok(Box::new(ContiguousCache { dtype: cx.kv_dtype }))
    }
}

struct ContiguousCache {
    dtype: KvDtype,
}

impl KvCache for ContiguousCache {
    fn new_sequence(&self, config: &ModelConfig) -> Box<dyn SequenceKv> {
        let shape = KvShape::of(config);
        let store = KvStore::new(self.dtype, shape, 0);
        Box::new(ContiguousSequence {
            dtype: self.dtype,
            layers: vec![(store.clone(), store); config.num_layers],
        })
    }
}

/// Each layer's keys and values; latent attention leaves the values empty.
#[derive(Clone)]
struct ContiguousSequence {
    dtype: KvDtype,
    layers: Vec<(KvStore, KvStore)>,
}

impl SequenceKv for ContiguousSequence {
    fn truncate(&mut self, tokens: usize) {
        for (k, v) in &mut self.layers {
            k.resize(k.tokens().min(tokens));
            v.resize(v.tokens().min(tokens));
        }
    }

    fn fork(&self) -> Box<dyn SequenceKv> {
        Box::new(self.clone())
    }

    fn len(&self, layer: usize) -> usize {
        self.layers[layer].0.tokens()
    }

    fn append(&mut self, layer: usize, keys: &Matrix, values: &Matrix) {
        let (k, v) = &mut self.layers[layer];
        for (store, rows) in [(k, keys), (v, values)] {
            if rows.cols == 0 {
                continue;
            }
            let at = store.tokens();
            store.resize(at + rows.rows);
            for r in 0..rows.rows {
                store.write(at + r, rows.row(r));
            }
        }
    }

    fn view(&self, layer: usize) -> KvView<'_> {
        let (k, v) = &self.layers[layer];
        KvView {
            keys: vec![k.chunk(0..k.tokens())],
            values: vec![v.chunk(0..v.tokens())],
            tokens: k.tokens(),
            first: 0,
            dtype: self.dtype,
        }
    }
}
