//! Loading a checkpoint with a list of plugins into a ready serving `App`.

use std::path::Path;
use std::sync::Arc;

use crate::app::{App, Pipeline};
use crate::config::ModelConfig;
use crate::model::Model;
use crate::ops::Operators;
use crate::pipeline;
use crate::plugin::{resolve, Plugin};
use crate::registry::Registry;
use crate::text;
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;

pub struct Engine {
    pub app: App,
    pub model: Arc<Model>,
    /// Absent when the checkpoint ships no `tokenizer.json`; token ids still work.
    pub tokenizer: Option<Arc<Tokenizer>>,
}

/// Expands `auto` into the plugins the checkpoint's config needs.
pub fn expand_auto(requested: &[String], config: &ModelConfig) -> Vec<String> {
    let mut names = Vec::new();
    for name in requested {
        if name == "auto" {
            names.extend(
                config
                    .required_plugins()
                    .into_iter()
                    .map(|(_, p)| p.to_string()),
            );
        } else {
            names.push(name.clone());
        }
    }
    names
}

impl Engine {
    pub fn load(
        dir: &Path,
        requested: &[String],
        registry: &Registry,
        catalog: &[Box<dyn Plugin>],
    ) -> anyhow::Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let names = expand_auto(requested, &config);
        let plugins = resolve(&names, registry, catalog)?;
        let mut app = App::new(Pipeline::Serving);
        for plugin in plugins {
            app.add_plugin(plugin)?;
        }
        let weights = Weights::open(dir)?;
        let model = Arc::new(Model::build(
            config,
            &weights,
            app.world.resource::<Operators>(),
        )?);
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(Arc::new(Tokenizer::from_dir(
                dir,
                model.config.bos_token_id,
            )?))
        } else {
            None
        };
        pipeline::install(&mut app, model.clone());
        if let Some(tokenizer) = &tokenizer {
            text::install(&mut app, tokenizer.clone());
        }
        Ok(Self {
            app,
            model,
            tokenizer,
        })
    }
}
