//! vibee engine core: the ECS `App` and `Plugin`s, the spec registry, tensors and the CPU
//! backend, operator traits and the model builder, checkpoint loaders, and the serving pipeline.

pub mod app;
pub mod checkpoint;
pub mod config;
pub mod conformance;
pub mod cpu;
pub mod divergence;
pub mod engine;
pub mod external;
pub mod gguf;
pub mod io;
pub mod model;
pub mod ops;
pub mod parallel;
pub mod pipeline;
pub mod plugin;
pub mod quant;
pub mod registry;
pub mod reload;
pub mod runner;
pub mod tensor;
pub mod text;
pub mod tokenizer;
pub mod weights;

pub use app::{App, Pipeline, Stage};
pub use config::ModelConfig;
pub use engine::Engine;
pub use model::Model;
pub use plugin::{Plugin, PluginSpec};
pub use registry::Registry;
pub use tensor::Matrix;
