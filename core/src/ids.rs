//! Typed identifiers.
//!
//! Names that users type (projects, cells, pools) are validated slugs, so they are safe in URLs,
//! Kubernetes labels and metric labels. Builds and jobs are numbered by the replicated state
//! machine, which makes them deterministic across replicas.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{value}`: {rule}")]
pub struct IdError {
    /// Which kind of identifier was being parsed ("project id", "cell id", …).
    pub what: &'static str,
    /// The rejected input.
    pub value: String,
    /// The rule it broke, phrased as what to do.
    pub rule: &'static str,
}

/// Project ids appear in webhook URLs, API paths and labels: lowercase letters, digits, `-`,
/// `_` and `.`, starting with a letter or digit, at most 63 characters.
fn check_slug(what: &'static str, value: &str) -> Result<(), IdError> {
    let err = |rule| {
        Err(IdError {
            what,
            value: value.to_owned(),
            rule,
        })
    };
    if value.is_empty() || value.len() > 63 {
        return err("use 1 to 63 characters");
    }
    if !value.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) {
        return err("start with a lowercase letter or a digit");
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
    {
        return err("use only lowercase letters, digits, `-`, `_` and `.`");
    }
    Ok(())
}

/// Cells and pools become Kubernetes label values and DNS names: an RFC 1123 label.
fn check_dns_label(what: &'static str, value: &str) -> Result<(), IdError> {
    let err = |rule| {
        Err(IdError {
            what,
            value: value.to_owned(),
            rule,
        })
    };
    if value.is_empty() || value.len() > 63 {
        return err("use 1 to 63 characters");
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return err("use only lowercase letters, digits and `-`");
    }
    if value.starts_with('-') || value.ends_with('-') {
        return err("start and end with a letter or a digit");
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $what:literal, $check:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                $check($what, &value)?;
                Ok(Self(value))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

string_id!(
    /// A project: one repository with its pipeline, secrets and tokens (a tenant).
    ProjectId,
    "project id",
    check_slug
);
string_id!(
    /// A cell: one Kubernetes cluster (or one local runner host) with its agent.
    CellId,
    "cell id",
    check_dns_label
);
string_id!(
    /// A named runner pool inside a cell (`default`, `large`, `arm64`, …).
    PoolName,
    "pool name",
    check_dns_label
);

macro_rules! number_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                s.parse().map(Self).map_err(|_| IdError {
                    what: $what,
                    value: s.to_owned(),
                    rule: "use a decimal number",
                })
            }
        }
    };
}

number_id!(
    /// A build: one pipeline run for one commit. Numbered by the replicated state machine.
    BuildId,
    "build id"
);
number_id!(
    /// A job within a build (one matrix expansion of one `jobs:` entry). Numbered globally.
    JobId,
    "job id"
);

/// Which attempt at a job this is: 1 for the first run, incremented by every retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Attempt(u32);

impl Attempt {
    /// The first attempt.
    pub const FIRST: Attempt = Attempt(1);

    /// Wraps an attempt number; attempts count from 1, so 0 is refused.
    pub fn new(n: u32) -> Option<Self> {
        (n >= 1).then_some(Self(n))
    }

    /// The attempt number, from 1.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The attempt after this one.
    #[must_use]
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl Default for Attempt {
    fn default() -> Self {
        Self::FIRST
    }
}

impl fmt::Display for Attempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The token that makes a job's assignment unique (ARCHITECTURE §6).
///
/// It is the Raft log index of the `PlaceJobs` entry that placed the job, so it strictly
/// increases with every placement. Every status update, log chunk, artifact and secret request
/// carries it; anything carrying an older fence than the job's current one is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fence(pub u64);

impl Fence {
    /// True when a message carrying `self` must be refused because the job has since been
    /// placed again under `current`.
    pub fn is_stale(self, current: Fence) -> bool {
        self < current
    }
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_ids_accept_slugs_and_refuse_path_characters() {
        assert!(ProjectId::new("acme-web.v2").is_ok());
        let err = ProjectId::new("acme/web").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid project id `acme/web`: use only lowercase letters, digits, `-`, `_` and `.`"
        );
        assert!(ProjectId::new("").is_err());
        assert!(ProjectId::new("-x").is_err());
        assert!(ProjectId::new("a".repeat(64)).is_err());
    }

    #[test]
    fn cell_ids_are_dns_labels() {
        assert!(CellId::new("eu-west-1a").is_ok());
        assert!(CellId::new("eu_west").is_err());
        assert!(CellId::new("eu-").is_err());
        assert!(PoolName::new("Large").is_err());
    }

    #[test]
    fn string_ids_are_validated_when_deserialized() {
        let ok: CellId = serde_json::from_str("\"c1\"").unwrap();
        assert_eq!(ok.as_str(), "c1");
        assert!(serde_json::from_str::<CellId>("\"C 1\"").is_err());
    }

    #[test]
    fn numeric_ids_round_trip_through_text() {
        let id: BuildId = "42".parse().unwrap();
        assert_eq!(id, BuildId(42));
        assert_eq!(id.to_string(), "42");
        assert!("b42".parse::<JobId>().is_err());
    }

    #[test]
    fn attempts_count_from_one() {
        assert_eq!(Attempt::new(0), None);
        assert_eq!(Attempt::FIRST.next().get(), 2);
        assert_eq!(Attempt::default(), Attempt::FIRST);
    }

    #[test]
    fn an_older_fence_is_stale_and_the_current_one_is_not() {
        assert!(Fence(7).is_stale(Fence(9)));
        assert!(!Fence(9).is_stale(Fence(9)));
    }
}
