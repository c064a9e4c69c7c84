//! `flotilla-cell-agent`: the agent that runs in every cell.
//!
//! Planned layout (ARCHITECTURE §8): the session client (leases, fences, heartbeats), runner
//! backends (`local` sandboxed processes, `kubernetes` pods), warm pools and the total-workload
//! autoscaler, the reaper, log shipping, and the artifact and secret brokers.
//!
//! Status: empty until the Cell agent issue.
