//! The federator's replicated state machine: `flotilla-core`'s [`State`] behind the consensus
//! crate's [`StateMachine`] trait.
//!
//! Every replica applies every committed entry; the [`Event`]s `apply` returns are sent on a
//! channel to the replica's reactor, which acts on them only while this replica leads.
//! Snapshots are the versioned [`Snapshot`] encoded with postcard.

use flotilla_consensus::StateMachine;
use flotilla_core::state::{Entry, Event, Response, Snapshot, State};
use tokio::sync::mpsc;

/// Committed events with the log index they were applied at.
pub type Events = mpsc::UnboundedReceiver<(u64, Vec<Event>)>;

/// [`State`] as a Raft state machine.
#[derive(Debug)]
pub struct Machine {
    state: State,
    events: mpsc::UnboundedSender<(u64, Vec<Event>)>,
}

impl Machine {
    /// An empty state, and the receiver of the events applying entries produces.
    pub fn new() -> (Self, Events) {
        let (events, rx) = mpsc::unbounded_channel();
        (
            Self {
                state: State::default(),
                events,
            },
            rx,
        )
    }

    /// The state as applied so far on this replica.
    pub fn state(&self) -> &State {
        &self.state
    }
}

impl StateMachine for Machine {
    type Command = Entry;
    type Response = Response;

    fn apply(&mut self, index: u64, command: Entry) -> Response {
        let Entry::V1(command) = command;
        let applied = self.state.apply(index, command);
        if !applied.events.is_empty() {
            // The reactor may be gone during shutdown; the state is what matters.
            let _ = self.events.send((index, applied.events));
        }
        applied.response
    }

    fn snapshot(&self) -> flotilla_consensus::types::SnapshotEncoder {
        // Job specs are shared (`Arc`), so this copy is cheap next to encoding, which runs
        // later without the lock.
        let state = self.state.clone();
        // Encoding plain in-memory data cannot fail; an empty snapshot would be refused on
        // restore rather than silently accepted.
        Box::new(move || postcard::to_stdvec(&Snapshot::V1(state)).unwrap_or_default())
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        match postcard::from_bytes::<Snapshot>(snapshot) {
            Ok(Snapshot::V1(state)) => {
                self.state = state;
                Ok(())
            }
            Err(e) => Err(format!("unreadable federator snapshot: {e}")),
        }
    }
}
