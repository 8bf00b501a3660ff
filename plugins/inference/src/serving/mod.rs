//! Serving family (v2380–v2399).

pub mod sampler;
