//! `flotilla-federator`: the front door and the brain of Flotilla.
//!
//! Planned layout (ARCHITECTURE §1, §9, §10): the axum HTTP server (webhook intake, REST API,
//! UI, SSE log tail, metrics, health), pipeline loading from git after a webhook is committed,
//! the leader's placement loop, the cell session service, and the history projector.
//!
//! Status: empty until the Federator issue.
