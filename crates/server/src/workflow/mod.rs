//! Durable workflows: definitions (`def`), parameter references
//! (`template`) and the engine that moves runs forward (`engine`).

pub mod def;
pub mod engine;
pub mod template;
