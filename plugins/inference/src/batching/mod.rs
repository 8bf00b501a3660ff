//! Batching family (v2320–v2339): how the engine's steps share the model among requests.
//! `continuous-batching` fills the `scheduler` slot; the others shape what it does each step.

pub mod chunked_prefill;
pub mod continuous;
pub mod fcfs;
pub mod preemption;
pub mod priority;
