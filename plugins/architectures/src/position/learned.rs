//! v2222 `learned-position`: a learned embedding per absolute position, added to the token
//! embeddings (GPT-2). Queries and keys are left as they are.

use vibee_core::config::{ModelConfig, PositionKind};
use vibee_core::ops::{BuildContext, Factory, PositionEncoding};
use vibee_core::weights::Weight;
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
        )))
    }
}

struct PositionTable(Weight);

impl PositionEncoding for PositionTable {
    fn apply(&self, _x: &mut Matrix, _heads: usize, _positions: &[usize]) {}

    fn embed(&self, x: &mut Matrix, positions: &[usize]) {
        let mut row = vec![0.0; x.cols];
        for (i, &p) in positions.iter().enumerate() {
            self.0.row_to_f32(p, &mut row);
            x.row_mut(i).iter_mut().zip(&row).for_each(|(v, e)| *v += e);
        }
    }
}
