//! Process-group handling and the stop signal shared by checkout and steps.

use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group};
use tokio::sync::watch;

/// How long to wait, after killing a process group, for the process to be reaped and its
/// output pipes to close. SIGKILL cannot be caught, so this only runs out when a process is
/// stuck in the kernel (a hung NFS mount) or escaped the group while holding a pipe.
pub(super) const KILL_GRACE: Duration = Duration::from_secs(5);

/// The process group of a child spawned with `process_group(0)`. Dropping it kills the group,
/// so a future that is dropped half-way (runtime shutdown) leaves no processes behind.
#[derive(Debug)]
pub(super) struct ProcessGroup {
    pgid: Option<Pid>,
}

impl ProcessGroup {
    /// The group led by the child with this id (`None` once it was reaped; then there is
    /// nothing to kill).
    pub(super) fn led_by(child_id: Option<u32>) -> Self {
        let pgid = child_id
            .and_then(|id| i32::try_from(id).ok())
            .and_then(Pid::from_raw);
        Self { pgid }
    }

    /// Sends SIGKILL to every process in the group. Errors are ignored: `ESRCH` means the
    /// group is already empty, which is the goal.
    pub(super) fn kill(&self) {
        if let Some(pgid) = self.pgid {
            let _ = kill_process_group(pgid, Signal::KILL);
        }
    }

    /// Kills the group one last time and forgets it. Called once the leader is reaped and
    /// its pipes are closed: a group id stays reserved while any member lives, so this still
    /// reaches stragglers, and after this the id may be reused by an unrelated process.
    pub(super) fn finish(mut self) {
        self.kill();
        self.pgid = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Tells an attempt's task to stop (cancel, a newer fence, shutdown).
#[derive(Debug)]
pub(crate) struct StopSignal(watch::Receiver<bool>);

impl StopSignal {
    /// A signal and the sender that fires it.
    pub(super) fn new() -> (watch::Sender<bool>, Self) {
        let (tx, rx) = watch::channel(false);
        (tx, Self(rx))
    }

    /// True once a stop was requested.
    pub(super) fn is_stopped(&mut self) -> bool {
        *self.0.borrow_and_update()
    }

    /// Resolves once a stop is requested. A dropped sender counts as a stop: only the
    /// backend drops it, when it has given up on the attempt.
    pub(crate) async fn stopped(&mut self) {
        while !*self.0.borrow_and_update() {
            if self.0.changed().await.is_err() {
                return;
            }
        }
    }
}

impl From<watch::Receiver<bool>> for StopSignal {
    /// A stop signal fired by `true` on the channel, or by dropping its sender.
    fn from(receiver: watch::Receiver<bool>) -> Self {
        Self(receiver)
    }
}
