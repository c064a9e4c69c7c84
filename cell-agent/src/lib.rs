//! `flotilla-cell-agent`: the agent that runs in every cell (ARCHITECTURE §8).
//!
//! Layout:
//! - [`agent`]: the session with the federator leader (hello, heartbeats, assignments,
//!   reports with at-least-once delivery, revocation) and the reaper.
//! - [`backend`]: runner backends behind `flotilla_core::runner::RunnerBackend` — `local`
//!   (sandboxed process trees) and `kubernetes` (a pod per attempt, warm pods) — and the
//!   conformance suite every backend must pass.
//! - [`config`]: the agent's configuration file.
//! - [`logs`]: the log aggregator (log stream → log store).
//! - `pools`: the warm pools' bookkeeping.
//! - [`runner`]: the commands that run inside a runner pod (`flotilla runner …`).
//!
//! Still to come (later issues): publishing runner output to the log stream, and the
//! artifact and secret brokers.

pub mod agent;
pub mod backend;
pub mod config;
pub mod logs;
mod pools;
pub mod runner;

pub use agent::{Agent, AgentAuth, AgentConfig, AgentStats};
