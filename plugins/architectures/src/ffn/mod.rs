//! FFN family (v2260–v2279).

pub mod gated;
pub mod geglu;
pub mod mlp;
pub mod swiglu;
