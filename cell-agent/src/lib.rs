//! `flotilla-cell-agent`: the agent that runs in every cell (ARCHITECTURE §8).
//!
//! Layout:
//! - [`agent`]: the session with the federator leader (hello, heartbeats, assignments,
//!   reports with at-least-once delivery, revocation) and the reaper.
//! - [`backend`]: runner backends behind `flotilla_core::runner::RunnerBackend` — `local`
//!   (sandboxed process trees) — and the conformance suite every backend must pass.
//!
//! Still to come (later issues): the `kubernetes` backend, warm pools and the total-workload
//! autoscaler, log shipping, and the artifact and secret brokers.

pub mod agent;
pub mod backend;
pub mod config;
mod pools;
pub mod runner;

pub use agent::{Agent, AgentAuth, AgentConfig, AgentStats};
