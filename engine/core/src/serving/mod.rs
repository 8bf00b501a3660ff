//! Serving: requests as entities, the pipeline's own systems, streaming text, the loaded
//! `Engine`, and the runner that drives requests to completion.

pub mod engine;
pub mod external;
pub mod pipeline;
pub mod reload;
pub mod runner;
pub mod text;
