//! Durable workflows: definitions (`def`), parameter references
//! (`template`), the engine that moves runs forward (`engine`), the
//! task graph drawn for the dashboard (`graph`) and the
//! workspace a run's tasks share (`workspace`).

pub mod def;
pub mod engine;
pub mod graph;
pub mod plan;
pub mod template;
pub mod workspace;
