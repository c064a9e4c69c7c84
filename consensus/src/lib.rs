//! `flotilla-consensus`: the Raft-replicated log under the federator.
//!
//! Planned layout (ARCHITECTURE §2, §4): an openraft type configuration generic over an
//! application state machine, durable log/vote/snapshot storage in redb, a tonic network
//! (append-entries, vote, streamed snapshot install), membership administration, and a
//! `propose(command)` write path that forwards to the leader. The federator plugs in
//! `flotilla_core`'s deterministic `apply`.
//!
//! Status: empty until the Consensus issue.
