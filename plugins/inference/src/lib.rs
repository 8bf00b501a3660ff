//! Built-in plugins of the Inference branch (v2300–v2399): one module per family, one file per
//! spec.

pub mod batching;
pub mod kv_cache;
pub mod quantization;
pub mod serving;

use vibee_core::Plugin;

/// Every plugin of this branch.
pub fn plugins() -> Vec<Box<dyn Plugin>> {
    vec![
        Box::new(kv_cache::contiguous::ContiguousKvCache),
        Box::new(kv_cache::paged::PagedKv),
        Box::new(kv_cache::prefix_cache::PrefixCache),
        Box::new(kv_cache::int8::KvInt8),
        Box::new(kv_cache::fp8::KvFp8),
        Box::new(batching::continuous::ContinuousBatching),
        Box::new(batching::chunked_prefill::ChunkedPrefill),
        Box::new(batching::preemption::Preemption),
        Box::new(batching::fcfs::Fcfs),
        Box::new(batching::priority::Priority),
        Box::new(quantization::gguf::Gguf),
        Box::new(quantization::int8::Int8),
        Box::new(quantization::q4::Q4),
        Box::new(quantization::hqq::Hqq),
        Box::new(quantization::awq::Awq),
        Box::new(quantization::gptq::Gptq),
        Box::new(serving::sampler::Sampler),
    ]
}
