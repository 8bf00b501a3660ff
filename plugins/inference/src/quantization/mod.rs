//! Quantization (v2340–v2359): how linear layers store and multiply their weights.

pub mod gguf;
