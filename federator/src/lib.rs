//! `flotilla-federator`: the front door and the brain of Flotilla.
//!
//! Layout (ARCHITECTURE §1, §9, §10):
//! - [`config`]: the replica's typed configuration.
//! - [`machine`]: `flotilla-core`'s replicated `State` as the consensus state machine.
//! - [`service`]: a running replica — Raft node, HTTP server, leader reactor — with
//!   `start`/`shutdown`.
//! - [`http`]: webhooks, the REST API, OpenAPI, health.
//! - [`webhook`]: signature checks and payload parsing for GitHub and GitLab.
//! - [`loader`]: pipeline loading after a delivery is committed.
//! - [`repo`]: `RepoSource` adapters (git, GitHub and GitLab file APIs).
//! - [`reactor`]: what the leader does with committed events.
//! - [`cells`]: cell agent sessions, the placement loop and lease expiry.
//! - [`clock`]: injected time.

pub mod cells;
pub mod clock;
pub mod config;
pub mod http;
pub mod loader;
pub mod machine;
pub mod reactor;
pub mod repo;
pub mod service;
pub mod webhook;
