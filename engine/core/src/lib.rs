//! vibee engine core. Each folder has one job:
//! - `app`: the ECS `App`, `Plugin`s, the spec registry, third-party libraries, hot reload;
//! - `config`: `config.json` and the model families;
//! - `io`: files the user brings (safetensors, GGUF, tokenizers, pipeline files);
//! - `backend`: the `Backend` operations operators are written in, and the CPU backend;
//! - `model`: operator traits, the model builder and the batched forward;
//! - `serving`: request components, the pipeline systems and the loaded `Engine`;
//! - `tools`: spec conformance and divergence.

pub mod app;
pub mod backend;
pub mod config;
pub mod io;
pub mod model;
pub mod serving;
pub mod tools;

pub use app::plugin::{Plugin, PluginSpec};
pub use app::registry::Registry;
pub use app::{App, Pipeline, Stage};
pub use backend::tensor::Matrix;
pub use config::ModelConfig;
pub use model::Model;
pub use serving::engine::Engine;
