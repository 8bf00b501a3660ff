//! v2303 `kv-int8`: the KV cache (contiguous or paged) stores keys and values as int8, one
//! symmetric scale per token and head (`max|x| / 127`), at a quarter of f32's memory plus the
//! scales; attention reads the codes in place. `--plugins paged-kv,kv-int8`.

use vibee_core::backend::kv::KvDtype;
use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{BuildContext, Factory, KvQuant};

pub struct KvInt8;

vibee_core::operator_plugin!(KvInt8, "v2303", "kv-int8", KvQuant);

impl Factory<dyn KvQuant> for KvInt8 {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        super::per_head_cache(config, "kv-int8")
    }

    fn build(
        &self,
        _cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn KvQuant>> {
        Ok(Box::new(super::Stored(KvDtype::Int8)))
    }
}
