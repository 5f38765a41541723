//! Durable workflows: definitions (`def`), parameter references
//! (`template`), the engine that moves runs forward (`engine`) and the
//! workspace a run's tasks share (`workspace`).

pub mod def;
pub mod engine;
pub mod plan;
pub mod template;
pub mod workspace;
