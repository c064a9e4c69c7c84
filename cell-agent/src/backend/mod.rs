//! Runner backends: implementations of `flotilla_core::runner::RunnerBackend`.
//!
//! - [`local`]: attempts as sandboxed process trees on this machine.
//! - [`conformance`]: the suite every backend must pass, run from each backend's tests.

pub mod conformance;
pub mod kubernetes;
pub mod local;

pub use local::{LocalBackend, LocalConfig, SandboxMode};
