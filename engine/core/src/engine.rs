//! Loading a checkpoint with a list of plugins into a ready serving `App`.

use std::path::Path;
use std::sync::Arc;

use crate::app::{App, Pipeline};
use crate::config::ModelConfig;
use crate::external::{self, PluginConfigs};
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
    /// Builds a serving engine for the checkpoint in `dir` with the `requested` plugins;
    /// `configs` configures third-party ones.
    pub fn load(
        dir: &Path,
        requested: &[String],
        registry: &Registry,
        catalog: &[Box<dyn Plugin>],
        configs: &PluginConfigs,
    ) -> anyhow::Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let names = expand_auto(requested, &config);
        let plugins = resolve(&names, registry, catalog)?;
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(Arc::new(Tokenizer::from_dir(dir, config.bos_token_id)?))
        } else {
            None
        };
        let mut app = App::new(Pipeline::Serving);
        // Text and third-party extensions come first: plugins' builds may depend on them.
        if let Some(tokenizer) = &tokenizer {
            text::install(&mut app, tokenizer.clone());
        }
        external::install(&mut app);
        app.world.insert_resource(configs.clone());
        for plugin in plugins {
            app.add_plugin(plugin)?;
        }
        let weights = Weights::open(dir)?;
        let model = Arc::new(Model::build(
            config,
            &weights,
            app.world.resource::<Operators>(),
        )?);
        pipeline::install(&mut app, model.clone());
        Ok(Self {
            app,
            model,
            tokenizer,
        })
    }
}
