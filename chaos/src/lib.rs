//! `flotilla-chaos`: proving that losing a replica, a cell or an agent loses no build.
//!
//! Planned layout (ARCHITECTURE §2): a drill runner (`flotilla chaos run|local DRILL.yaml`) with
//! a fault-injecting TCP proxy and signals, an invariant checker over the recorded history, and
//! a seeded deterministic simulation of the whole system.
//!
//! Status: empty until the Chaos issue.
