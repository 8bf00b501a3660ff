//! v2304 `kv-fp8`: the KV cache (contiguous or paged) stores keys and values as fp8 e4m3
//! (`float8_e4m3fn`), one scale per token and head (`max|x| / 448`); e4m3's relative step is
//! the same at every magnitude, where int8's is finest for a head's largest values.
//! `--plugins paged-kv,kv-fp8`.

use vibee_core::backend::kv::KvDtype;

super::kv_quant_plugin!(KvFp8, "v2304", "kv-fp8", KvDtype::Fp8E4M3);
