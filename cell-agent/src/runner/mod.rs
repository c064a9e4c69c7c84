//! The runner wrapper: what runs *inside* a runner (a Kubernetes pod today), started as
//! `flotilla runner …`.
//!
//! A runner pod runs, in order:
//! 1. [`install`] (init container, Flotilla image): copies the `flotilla` binary into a volume
//!    shared with the job container;
//! 2. [`checkout`] (init container, Flotilla image, only when the job has code): checks the
//!    job's commit out into the workspace volume;
//! 3. [`exec`] (the job's own container and image, started as the copied binary): runs the
//!    job's steps in the workspace with the local backend's step runner
//!    ([`run_in_place`](crate::backend::local::run_in_place)).
//!
//! A *warm* runner pod, created before its job is known, runs [`install`] the same way, then
//! [`standby`]'s two halves side by side:
//! 1. `flotilla runner standby` (container `checkout`, Flotilla image): waits for the cell
//!    agent to send the job over HTTP, checks its commit out into the workspace volume, and
//!    leaves the job (without its clone URL) or why there is none in the handoff volume;
//! 2. `flotilla runner handoff` (the job container, the pool's image): waits for that file,
//!    then runs the job as [`exec`] does (or reports the failed checkout).
//!
//! Each writes [`record`]s, one JSON object per line, on its standard output (the pod log),
//! and all but `install` leave the outcome in the container's termination message,
//! which the Kubernetes backend reads back from the pod status.
//!
//! - [`record`]: the wrapper's output protocol (JSON lines) and termination message.
//! - [`sealed`]: how a warm pod's job is sealed for the trip from the agent to its standby.
pub mod checkout;
pub mod exec;
pub mod install;
pub mod record;
pub mod sealed;
pub mod standby;
