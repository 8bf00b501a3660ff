//! v2303 `kv-int8`: the KV cache (contiguous or paged) stores keys and values as int8, one
//! symmetric scale per token and head (`max|x| / 127`), at a quarter of f32's memory plus the
//! scales; attention reads the codes in place. `--plugins paged-kv,kv-int8`.

use vibee_core::backend::kv::KvDtype;

super::kv_quant_plugin!(KvInt8, "v2303", "kv-int8", KvDtype::Int8);
