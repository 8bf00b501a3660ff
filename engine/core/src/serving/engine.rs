//! Loading a checkpoint with a list of plugins into a ready serving `App`.

use std::path::Path;
use std::sync::Arc;

use crate::app::plugin::{resolve, Plugin};
use crate::app::registry::Registry;
use crate::app::{App, Pipeline};
use crate::config::ModelConfig;
use crate::io::tokenizer::Tokenizer;
use crate::model::checkpoint::Checkpoint;
use crate::model::ops::Operators;
use crate::model::Model;
use crate::serving::external::{self, PluginConfigs};
use crate::serving::pipeline;
use crate::serving::text;

pub struct Engine {
    pub app: App,
    pub model: Arc<Model>,
    /// Absent when the checkpoint ships no tokenizer; token ids still work.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Why a GGUF file's embedded vocabulary could not be read (a form vibee does not run
    /// yet): the model still runs on token ids.
    pub tokenizer_error: Option<String>,
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
    /// Builds a serving engine for the checkpoint at `path` (a model directory or a GGUF
    /// file, see [`Checkpoint::open`]) with the `requested` plugins; `configs` configures
    /// third-party ones.
    pub fn load(
        path: &Path,
        requested: &[String],
        registry: &Registry,
        catalog: &[Box<dyn Plugin>],
        configs: &PluginConfigs,
    ) -> anyhow::Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let config = checkpoint.config()?;
        let names = expand_auto(requested, &config);
        let plugins = resolve(&names, registry, catalog)?;
        let (tokenizer, tokenizer_error) = match checkpoint.tokenizer(&config) {
            Ok(tokenizer) => (tokenizer.map(Arc::new), None),
            Err(e) if matches!(checkpoint, Checkpoint::Gguf { .. }) => {
                (None, Some(format!("{e:#}")))
            }
            Err(e) => return Err(e),
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
        if !app.world.contains_resource::<pipeline::Scheduler>() {
            anyhow::bail!(
                "no plugin fills the `scheduler` slot (`continuous-batching`): no request would ever run"
            );
        }
        let weights = checkpoint.weights(&config)?;
        let model = Arc::new(Model::build(
            config,
            &weights,
            app.world.resource::<Operators>(),
            crate::backend::default_backend(),
        )?);
        pipeline::install(&mut app, model.clone());
        Ok(Self {
            app,
            model,
            tokenizer,
            tokenizer_error,
        })
    }
}
