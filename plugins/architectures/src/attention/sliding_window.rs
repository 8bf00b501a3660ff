//! v2203 `sliding-window`: each query attends to at most the latest `sliding_window` positions
//! (itself included), in the layers the checkpoint marks (Mistral: all; Qwen2: from
//! `max_window_layers` on, or as `layer_types` lists).

use vibee_core::config::ModelConfig;
use vibee_core::model::ops::{AttentionWindow, BuildContext, Factory};

pub struct SlidingWindow;

vibee_core::operator_plugin!(SlidingWindow, "v2203", "sliding-window", AttentionWindow);

impl Factory<dyn AttentionWindow> for SlidingWindow {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        if config.sliding_layers.iter().any(Option::is_some) {
            Ok(())
        } else {
            Err(
                "config.json sets no sliding_window (or disables it with use_sliding_window)"
                    .into(),
            )
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn AttentionWindow>> {
        Ok(Box::new(LayerWindows(cx.config.sliding_layers.clone())))
    }
}

struct LayerWindows(Vec<Option<usize>>);

impl AttentionWindow for LayerWindows {
    fn window(&self, layer: usize) -> Option<usize> {
        self.0.get(layer).copied().flatten()
    }
}
