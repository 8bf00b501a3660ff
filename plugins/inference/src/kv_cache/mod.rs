//! KV-cache family (v2300–v2319): layouts, and how they store their elements.

pub mod contiguous;
pub mod fp8;
pub mod int8;
pub mod paged;
pub mod prefix_cache;

use vibee_core::backend::kv::KvDtype;
use vibee_core::config::ModelConfig;
use vibee_core::model::ops::KvQuant;

/// Declares KV-quantization plugin `$plugin` (spec `$id`, named `$name`), storing `$dtype`.
macro_rules! kv_quant_plugin {
    ($plugin:ident, $id:literal, $name:literal, $dtype:expr) => {
        pub struct $plugin;

        vibee_core::operator_plugin!($plugin, $id, $name, KvQuant);

        impl vibee_core::model::ops::Factory<dyn vibee_core::model::ops::KvQuant> for $plugin {
            fn check(&self, config: &vibee_core::config::ModelConfig) -> Result<(), String> {
                super::per_head_cache(config, $name)
            }

            fn build(
                &self,
                _cx: &vibee_core::model::ops::BuildContext<'_>,
                _prefix: &str,
                _dim: usize,
            ) -> anyhow::Result<Box<dyn vibee_core::model::ops::KvQuant>> {
                Ok(Box::new(super::Stored($dtype)))
            }
        }
    };
}
use kv_quant_plugin;

/// A KV-quantization plugin's choice of element type.
struct Stored(KvDtype);

impl KvQuant for Stored {
    fn dtype(&self) -> KvDtype {
        self.0
    }
}

/// KV quantization scales each key/value head of each token; latent attention's compressed
/// cache has no heads, and its quantization has no reference to be measured against yet.
fn per_head_cache(config: &ModelConfig, plugin: &str) -> Result<(), String> {
    match config.mla {
        Some(m) => Err(format!(
            "{plugin} quantizes per-head keys and values, and this checkpoint's latent attention \
             (`kv_lora_rank` {}) caches a compressed latent instead",
            m.kv_lora_rank
        )),
        None => Ok(()),
    }
}
