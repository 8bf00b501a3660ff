//! Norm family (v2240–v2259).

pub mod rmsnorm;
