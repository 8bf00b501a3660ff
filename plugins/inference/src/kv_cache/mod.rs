//! KV-cache family (v2300–v2319).

pub mod contiguous;
pub mod paged;
pub mod prefix_cache;
