//! Tools that check an implementation: spec conformance and next-token divergence.

pub mod conformance;
pub mod divergence;
