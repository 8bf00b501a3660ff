//! Norm family (v2240–v2259).

pub mod offset_rmsnorm;
pub mod qk_norm;
pub mod rmsnorm;
