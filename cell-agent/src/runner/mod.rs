//! The runner wrapper: what runs *inside* a runner (a Kubernetes pod today), started as
//! `flotilla runner …`.
//!
//! - [`record`]: the wrapper's output protocol (JSON lines) and termination message.
pub mod record;
