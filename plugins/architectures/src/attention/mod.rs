//! Attention family (v2200–v2219).

pub mod causal;
pub mod flash;
pub mod gqa;
pub mod mha;
pub mod mqa;
pub mod qkv_bias;
pub mod sliding_window;
pub mod softcap;
