//! Arch-search family (v2280–v2299): tools that size architectures without loading weights.

pub mod arch_calc;
