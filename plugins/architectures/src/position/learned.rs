//! v2222 `learned-position`: a learned embedding per absolute position, added to the token
//! embeddings (GPT-2). Queries and keys are left as they are.

use std::sync::Arc;

use vibee_core::backend::Backend;
use vibee_core::config::{ModelConfig, PositionKind};
use vibee_core::io::weights::Weight;
use vibee_core::model::ops::{BuildContext, Factory, PositionEncoding};
use vibee_core::Matrix;

pub struct LearnedPosition;

vibee_core::operator_plugin!(LearnedPosition, "v2222", "learned-position", Position);

impl Factory<dyn PositionEncoding> for LearnedPosition {
    fn check(&self, config: &ModelConfig) -> Result<(), String> {
        match (config.position, config.layout.position_embed) {
            (PositionKind::Learned, Some(_)) => Ok(()),
            (PositionKind::Learned, None) => Err(format!(
                "model_type {} has no learned position table",
                config.model_type
            )),
            (other, _) => Err(super::mismatch(config, other)),
        }
    }

    fn build(
        &self,
        cx: &BuildContext<'_>,
        _prefix: &str,
        _dim: usize,
    ) -> anyhow::Result<Box<dyn PositionEncoding>> {
        let name = cx
            .config
            .layout
            .position_embed
            .expect("checked before building");
        let shape = [cx.config.max_position_embeddings, cx.config.hidden_size];
        Ok(Box::new(PositionTable(
            cx.weight(&format!("{name}.weight"), &shape)?,
            cx.backend.clone(),
        )))
    }
}

struct PositionTable(Weight, Arc<dyn Backend>);

impl PositionEncoding for PositionTable {
    fn apply(&self, _x: &mut Matrix, _heads: usize, _positions: &[usize]) {}

    fn embed(&self, x: &mut Matrix, positions: &[usize]) {
        let positions: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        self.1.add(x, &self.1.embed(&self.0, &positions));
    }
}
