//! Position family (v2220–v2239).

pub mod alibi;
pub mod rope;
