//! Built-in plugins of the Architectures branch (v2200–v2299): one module per family, one file
//! per spec.

pub mod arch_search;
pub mod attention;
pub mod ffn;
pub mod norm;
pub mod position;

use vibee_core::Plugin;

/// Every plugin of this branch.
pub fn plugins() -> Vec<Box<dyn Plugin>> {
    vec![
        Box::new(attention::mha::Mha),
        Box::new(attention::mqa::Mqa),
        Box::new(attention::gqa::Gqa),
        Box::new(attention::flash::FlashAttention),
        Box::new(attention::mla::Mla),
        Box::new(attention::sliding_window::SlidingWindow),
        Box::new(attention::qkv_bias::QkvBias),
        Box::new(attention::softcap::Softcap),
        Box::new(position::rope::Rope),
        Box::new(position::alibi::Alibi),
        Box::new(position::learned::LearnedPosition),
        Box::new(position::nope::Nope),
        Box::new(norm::rmsnorm::RmsNorm),
        Box::new(norm::offset_rmsnorm::OffsetRmsNorm),
        Box::new(norm::qk_norm::QkNorm),
        Box::new(norm::layernorm::LayerNorm),
        Box::new(norm::pre_norm::PRE_NORM),
        Box::new(norm::post_norm::POST_NORM),
        Box::new(norm::parallel_residual::PARALLEL_RESIDUAL),
        Box::new(norm::sandwich_norm::SANDWICH_NORM),
        Box::new(ffn::swiglu::SwiGlu),
        Box::new(ffn::geglu::GeGlu),
        Box::new(ffn::mlp::Mlp),
        Box::new(ffn::moe::Moe),
        Box::new(arch_search::arch_calc::ArchCalc),
    ]
}
