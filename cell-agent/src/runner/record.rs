//! The runner wrapper's output protocol: what `flotilla runner exec` writes to its standard
//! output, one JSON object per line, and what the Kubernetes backend reads back from the
//! pod's log.
//!
//! Every record carries `ts` (ms since the Unix epoch, never decreasing within one attempt).
//! `k` says which record it is:
//! - `{"k":"line","ts":..,"s":"out"|"err"|"sys","step":0,"t":"text"}`: one output line
//!   (`step` absent for lines outside any step);
//! - `{"k":"started","ts":..}`: the first step is executing;
//! - `{"k":"finished","ts":..,"outcome":..}`: the attempt ended (always the last record).
//!
//! The same [`Termination`] is also written to the container's termination-message file, so
//! the outcome survives even when the log is lost (Kubernetes keeps it in the pod status).
//! A line that is not a record (a crash message from the dynamic loader, say) is kept as a
//! system line, never dropped.

use flotilla_core::job::{FailureClass, InfraReason, Outcome};
use flotilla_core::runner::{RunnerEvent, Stream};
use serde::{Deserialize, Serialize};

/// The version of this protocol, passed to the wrapper as `--protocol` by renderers so an
/// older wrapper refuses a newer format loudly instead of misreading it.
pub const PROTOCOL_VERSION: u32 = 1;

/// Exit status of `flotilla runner exec` (and `checkout`) when the attempt ran past its
/// timeout. Like the other statuses here, it is only the fallback for when the termination
/// message is lost: a step may exit with these codes itself.
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit status when the wrapper could not run the job at all (unreadable spec, protocol
/// mismatch, no shell, a failed checkout): the outcome is `Infra{RunnerCrash}` or `Config`.
pub const EXIT_NOT_RUN: u8 = 125;
/// Exit status when the attempt was stopped by SIGTERM or SIGINT.
pub const EXIT_CANCELLED: u8 = 130;

/// The wrapper's exit status for `outcome`: 0 on success, the failing step's exit code on a
/// step failure (1 if it does not fit in a status), [`EXIT_TIMED_OUT`], [`EXIT_CANCELLED`],
/// and [`EXIT_NOT_RUN`] for `Config` and infrastructure failures.
pub fn exit_code_for(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Succeeded => 0,
        Outcome::Failed(FailureClass::Test { exit_code }) => u8::try_from(exit_code)
            .ok()
            .filter(|c| *c != 0)
            .unwrap_or(1),
        Outcome::Failed(FailureClass::Timeout) => EXIT_TIMED_OUT,
        Outcome::Failed(FailureClass::Cancelled) => EXIT_CANCELLED,
        Outcome::Failed(FailureClass::Config | FailureClass::Infra { .. }) => EXIT_NOT_RUN,
    }
}

/// The best reading of the wrapper's exit status when there is no termination message: the
/// inverse of [`exit_code_for`], taking [`EXIT_NOT_RUN`] as `Infra{RunnerCrash}` and any
/// other non-zero status as the failing step's.
pub fn outcome_for_exit_code(code: i32) -> Outcome {
    match code {
        0 => Outcome::Succeeded,
        c if c == i32::from(EXIT_TIMED_OUT) => Outcome::Failed(FailureClass::Timeout),
        c if c == i32::from(EXIT_CANCELLED) => Outcome::Failed(FailureClass::Cancelled),
        c if c == i32::from(EXIT_NOT_RUN) => Outcome::Failed(FailureClass::Infra {
            reason: InfraReason::RunnerCrash,
        }),
        exit_code => Outcome::Failed(FailureClass::Test { exit_code }),
    }
}

/// Which stream a line came from, as written on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireStream {
    /// Standard output of a step.
    #[serde(rename = "out")]
    Stdout,
    /// Standard error of a step.
    #[serde(rename = "err")]
    Stderr,
    /// The wrapper's own messages.
    #[serde(rename = "sys")]
    System,
}

impl From<Stream> for WireStream {
    fn from(s: Stream) -> Self {
        match s {
            Stream::Stdout => WireStream::Stdout,
            Stream::Stderr => WireStream::Stderr,
            Stream::System => WireStream::System,
        }
    }
}

impl From<WireStream> for Stream {
    fn from(s: WireStream) -> Self {
        match s {
            WireStream::Stdout => Stream::Stdout,
            WireStream::Stderr => Stream::Stderr,
            WireStream::System => Stream::System,
        }
    }
}

/// One record of the wrapper's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Record {
    /// One output line.
    Line {
        /// When it was read.
        ts: u64,
        /// Which stream.
        s: WireStream,
        /// The step that wrote it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<u32>,
        /// The text, without its line terminator.
        t: String,
    },
    /// The first step is executing.
    Started {
        /// When.
        ts: u64,
    },
    /// The attempt ended.
    Finished {
        /// When.
        ts: u64,
        /// How.
        outcome: Outcome,
    },
}

impl Record {
    /// The record for a runner event.
    pub fn from_event(event: &RunnerEvent) -> Self {
        match event {
            RunnerEvent::Started { at_ms } => Record::Started { ts: *at_ms },
            RunnerEvent::Line {
                stream,
                step,
                text,
                at_ms,
            } => Record::Line {
                ts: *at_ms,
                s: (*stream).into(),
                step: *step,
                t: text.clone(),
            },
            RunnerEvent::Finished { outcome, at_ms } => Record::Finished {
                ts: *at_ms,
                outcome: *outcome,
            },
        }
    }

    /// The runner event this record stands for.
    pub fn into_event(self) -> RunnerEvent {
        match self {
            Record::Started { ts } => RunnerEvent::Started { at_ms: ts },
            Record::Line { ts, s, step, t } => RunnerEvent::Line {
                stream: s.into(),
                step,
                text: t,
                at_ms: ts,
            },
            Record::Finished { ts, outcome } => RunnerEvent::Finished { outcome, at_ms: ts },
        }
    }

    /// A line from the wrapper itself, outside any step.
    pub fn system(ts: u64, text: impl Into<String>) -> Self {
        Record::Line {
            ts,
            s: WireStream::System,
            step: None,
            t: text.into(),
        }
    }

    /// When it happened (ms since the Unix epoch).
    pub fn ts(&self) -> u64 {
        match self {
            Record::Line { ts, .. } | Record::Started { ts } | Record::Finished { ts, .. } => *ts,
        }
    }

    /// One line of wire format (no terminator).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("records always serialize")
    }

    /// Reads one line of wire format. A line that is not a record becomes a system line
    /// stamped `now_ms`, so nothing a container prints is lost.
    pub fn parse_line(line: &str, now_ms: u64) -> Record {
        serde_json::from_str(line).unwrap_or_else(|_| Record::Line {
            ts: now_ms,
            s: WireStream::System,
            step: None,
            t: line.to_owned(),
        })
    }
}

/// What the wrapper (and the checkout init container) leave in the container's termination
/// message: how the attempt ended and, on failure, why in one sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Termination {
    /// The protocol version ([`PROTOCOL_VERSION`]).
    pub v: u32,
    /// How the attempt (or checkout) ended.
    pub outcome: Outcome,
    /// Why, for a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Termination {
    /// Kubernetes keeps at most 4096 bytes of a termination message.
    pub const MAX_BYTES: usize = 4096;

    /// The JSON to write, with the message shortened to fit [`Self::MAX_BYTES`].
    pub fn to_json(&self) -> String {
        let mut t = self.clone();
        loop {
            let json = serde_json::to_string(&t).expect("terminations always serialize");
            if json.len() <= Self::MAX_BYTES {
                return json;
            }
            match &mut t.message {
                Some(m) if !m.is_empty() => {
                    let mut keep = m.len().saturating_sub(json.len() - Self::MAX_BYTES + 3);
                    while !m.is_char_boundary(keep) {
                        keep -= 1;
                    }
                    m.truncate(keep);
                    m.push('…');
                }
                _ => return json,
            }
        }
    }

    /// Reads a termination message; `None` when it is not one of ours.
    pub fn parse(text: &str) -> Option<Termination> {
        serde_json::from_str(text.trim()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_reads_back_from_its_exit_status() {
        let outcomes = [
            Outcome::Succeeded,
            Outcome::Failed(FailureClass::Test { exit_code: 3 }),
            Outcome::Failed(FailureClass::Test { exit_code: 137 }),
            Outcome::Failed(FailureClass::Timeout),
            Outcome::Failed(FailureClass::Cancelled),
            Outcome::Failed(FailureClass::Infra {
                reason: InfraReason::RunnerCrash,
            }),
        ];
        for outcome in outcomes {
            let code = exit_code_for(outcome);
            assert_eq!(outcome_for_exit_code(i32::from(code)), outcome, "{code}");
        }
        assert_eq!(
            exit_code_for(Outcome::Failed(FailureClass::Config)),
            EXIT_NOT_RUN
        );
        // A step failure never reads as success, whatever its code.
        for exit_code in [0, 256, -1] {
            assert_eq!(
                exit_code_for(Outcome::Failed(FailureClass::Test { exit_code })),
                1
            );
        }
    }

    #[test]
    fn records_round_trip_through_their_wire_lines() {
        let records = [
            Record::Started { ts: 5 },
            Record::Line {
                ts: 6,
                s: WireStream::Stderr,
                step: Some(1),
                t: "warning: \"quoted\"\tand tabbed".into(),
            },
            Record::Line {
                ts: 7,
                s: WireStream::System,
                step: None,
                t: String::new(),
            },
            Record::Finished {
                ts: 8,
                outcome: Outcome::Failed(FailureClass::Test { exit_code: 3 }),
            },
        ];
        for r in records {
            let line = r.to_line();
            assert!(!line.contains('\n'), "{line}");
            assert_eq!(Record::parse_line(&line, 0), r);
        }
        assert_eq!(
            Record::parse_line(r#"{"k":"line","ts":1,"s":"out","t":"hi"}"#, 0).into_event(),
            RunnerEvent::Line {
                stream: Stream::Stdout,
                step: None,
                text: "hi".into(),
                at_ms: 1
            }
        );
    }

    #[test]
    fn a_line_that_is_not_a_record_is_kept_as_a_system_line() {
        assert_eq!(
            Record::parse_line("exec /flotilla/bin/flotilla: no such file or directory", 42),
            Record::Line {
                ts: 42,
                s: WireStream::System,
                step: None,
                t: "exec /flotilla/bin/flotilla: no such file or directory".into(),
            }
        );
    }

    #[test]
    fn a_long_termination_message_is_cut_to_what_kubernetes_keeps() {
        let t = Termination {
            v: PROTOCOL_VERSION,
            outcome: Outcome::Failed(FailureClass::Config),
            message: Some("é".repeat(5000)),
        };
        let json = t.to_json();
        assert!(json.len() <= Termination::MAX_BYTES, "{}", json.len());
        let back = Termination::parse(&json).expect("parses");
        assert_eq!(back.outcome, t.outcome);
        assert!(back.message.expect("kept").ends_with('…'));
    }
}
