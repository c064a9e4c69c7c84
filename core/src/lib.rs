//! `flotilla-core`: the pure domain of Flotilla — no I/O, no async, no clock.
//!
//! Everything here is a function from values to values, so it is the easiest code in the
//! project to test and the one most worth testing. Time and randomness, where a later policy
//! needs them, come in as arguments.
//!
//! Layout:
//! - [`autoscale`]: runner pools sized by total workload, the time-of-day floor and the
//!   two-phase scale-down that never deletes a busy runner (ARCHITECTURE §8).
//! - [`ids`]: typed identifiers ([`ProjectId`], [`BuildId`], [`JobId`], [`CellId`],
//!   [`PoolName`]) and the per-job counters [`Attempt`] and [`Fence`].
//! - [`pipeline`]: the `.ci.yaml` v1 spec — parsing with limits, validation with
//!   `file:line:col` diagnostics, matrix expansion, triggers and the `if:` expression language.
//! - [`dag`]: job graphs — cycle detection, topological stages, which jobs are ready.
//! - [`job`]: the job lifecycle of ARCHITECTURE §6 as an explicit transition table, the failure
//!   taxonomy and the retry decision.
//! - [`placement`]: where queued jobs go: weighted fair share across tenants, home cells,
//!   API budgets (ARCHITECTURE §7).
//! - [`forge`]: the normalised forge event a webhook becomes, and its event variables.
//! - [`repo`]: the `RepoSource` port that reads `.ci.yaml` at a commit.
//! - [`runner`]: the `RunnerBackend` port that runs one job attempt in isolation.
//! - [`simulate`]: `flotilla simulate`'s engine: days of CI load in virtual time through the
//!   real scheduler and autoscaler, reporting queue waits and idle runner time.
//! - [`state`]: the replicated control state and its deterministic `apply`.
//! - [`suggest`]: "did you mean" suggestions shared by every error that names a thing.

pub mod aggregate;
pub mod autoscale;
pub mod dag;
pub mod forge;
pub mod ids;
pub mod job;
pub mod mask;
pub mod pipeline;
pub mod placement;
pub mod repo;
pub mod runner;
pub mod simulate;
pub mod state;
pub mod store;
pub mod suggest;

pub use ids::{Attempt, BuildId, CellId, Fence, IdError, JobId, PoolName, ProjectId};
