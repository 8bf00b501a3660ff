//! v2304 `kv-fp8`: the KV cache (contiguous or paged) stores keys and values as fp8 e4m3
//! (`float8_e4m3fn`), one scale per token and head (`max|x| / 448`); e4m3's relative step is
//! the same at every magnitude, where int8's is finest for a head's largest values.
//! `--plugins paged-kv,kv-fp8`.

use vibee_core::backend::kv::KvDtype;
use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{BuildContext, Factory, KvQuant};

pub struct KvFp8;

vibee_core::operator_plugin!(KvFp8, "v2304", "kv-fp8", KvQuant);

impl Factory<dyn KvQuant> for KvFp8 {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        super::per_head_cache(config, "kv-fp8")
    }

    fn build(
        &self,
        _cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn KvQuant>> {
        Ok(Box::new(super::Stored(KvDtype::Fp8E4M3)))
    }
}
