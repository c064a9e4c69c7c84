//! [`S3Config`]: which bucket, where, and the credentials (from files or the environment,
//! never inline, so the configuration file can be shown and committed).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The S3 adapters' configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The bucket every object goes in (3 to 63 lowercase letters, digits, `.` and `-`).
    pub bucket: String,
    /// The bucket's region (for S3-compatible stores, whatever they expect; most accept the
    /// default).
    #[serde(default = "default_region")]
    pub region: String,
    /// The service's base URL, for an S3-compatible store (`http://minio:9000`). Absent: AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Address the bucket in the path (`{endpoint}/{bucket}/{key}`) rather than the host name
    /// (`{bucket}.{endpoint}`): most S3-compatible stores need this.
    #[serde(default)]
    pub path_style: bool,
    /// A prefix before every key, to share a bucket between installations (`flotilla/prod/`).
    /// Must end with `/` and not start with one. Absent: keys start at the bucket's root.
    #[serde(default)]
    pub prefix: Option<String>,
    /// A file holding the access key id. With [`Self::secret_access_key_file`], or neither:
    /// then the environment's `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` are used.
    #[serde(default)]
    pub access_key_id_file: Option<PathBuf>,
    /// A file holding the secret access key (see [`Self::access_key_id_file`]).
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
}

/// AWS's default region.
pub fn default_region() -> String {
    "us-east-1".to_owned()
}

/// What is wrong with an [`S3Config`], or why its credentials could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3ConfigError {
    /// A field's value cannot be right.
    #[error("s3.{field}: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The credentials could not be read from their files or the environment.
    #[error("s3 credentials: {0}")]
    Credentials(String),
}

impl S3Config {
    /// A configuration for `bucket` with every other field at its default.
    pub fn new(bucket: impl Into<String>) -> Self {
        S3Config {
            bucket: bucket.into(),
            region: default_region(),
            endpoint: None,
            path_style: false,
            prefix: None,
            access_key_id_file: None,
            secret_access_key_file: None,
        }
    }

    /// Checks every field; call before anything starts.
    pub fn validate(&self) -> Result<(), S3ConfigError> {
        let invalid = |field, why: &str| {
            Err(S3ConfigError::Invalid {
                field,
                why: why.to_owned(),
            })
        };
        let b = self.bucket.as_bytes();
        if !(3..=63).contains(&b.len()) {
            return invalid("bucket", "must be 3 to 63 characters");
        }
        if !b
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'.' || *c == b'-')
        {
            return invalid(
                "bucket",
                "may hold only lowercase letters, digits, `.` and `-`",
            );
        }
        if !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
            return invalid("bucket", "must start and end with a letter or a digit");
        }
        if self.region.is_empty()
            || !self
                .region
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-')
        {
            return invalid("region", "must be a region name such as `us-east-1`");
        }
        if let Some(endpoint) = &self.endpoint {
            let rest = endpoint
                .strip_prefix("https://")
                .or_else(|| endpoint.strip_prefix("http://"));
            match rest {
                Some(host) if !host.is_empty() && !host.starts_with('/') => {}
                _ => return invalid("endpoint", "must be an http:// or https:// URL with a host"),
            }
        }
        if let Some(prefix) = &self.prefix {
            if prefix.is_empty() || prefix.starts_with('/') || !prefix.ends_with('/') {
                return invalid(
                    "prefix",
                    "must end with `/` and not start with one (`flotilla/prod/`)",
                );
            }
            if prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains("//") {
                return invalid("prefix", "must not have empty, `.` or `..` components");
            }
        }
        match (&self.access_key_id_file, &self.secret_access_key_file) {
            (Some(_), None) => invalid(
                "secret_access_key_file",
                "is needed with access_key_id_file (or give neither to use the environment)",
            ),
            (None, Some(_)) => invalid(
                "access_key_id_file",
                "is needed with secret_access_key_file (or give neither to use the environment)",
            ),
            _ => Ok(()),
        }
    }

    /// The key prefix, `""` when there is none.
    pub(crate) fn key_prefix(&self) -> &str {
        self.prefix.as_deref().unwrap_or("")
    }

    /// Reads the credentials from the files, or from the environment when no file is given.
    pub(crate) fn credentials(&self) -> Result<StaticKeys, S3ConfigError> {
        match (&self.access_key_id_file, &self.secret_access_key_file) {
            (Some(id), Some(secret)) => Ok(StaticKeys {
                access_key_id: read_secret_file(id)?,
                secret_access_key: read_secret_file(secret)?,
            }),
            _ => {
                let var = |name: &str| {
                    std::env::var(name)
                        .ok()
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| {
                            S3ConfigError::Credentials(format!(
                                "no credential files are configured and {name} is not set"
                            ))
                        })
                };
                Ok(StaticKeys {
                    access_key_id: var("AWS_ACCESS_KEY_ID")?,
                    secret_access_key: var("AWS_SECRET_ACCESS_KEY")?,
                })
            }
        }
    }
}

fn read_secret_file(path: &Path) -> Result<String, S3ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| S3ConfigError::Credentials(format!("reading {}: {e}", path.display())))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(S3ConfigError::Credentials(format!(
            "{} is empty",
            path.display()
        )));
    }
    Ok(value.to_owned())
}

/// An access key pair, redacted in `Debug`.
#[derive(Clone)]
pub(crate) struct StaticKeys {
    pub(crate) access_key_id: String,
    pub(crate) secret_access_key: String,
}

impl fmt::Debug for StaticKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeys")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_like_json: &str) -> Result<S3Config, serde_json::Error> {
        serde_json::from_str(toml_like_json)
    }

    #[test]
    fn a_minimal_config_takes_the_defaults_and_validates() {
        let c = parse(r#"{"bucket": "flotilla-logs"}"#).unwrap();
        assert_eq!(c, S3Config::new("flotilla-logs"));
        assert_eq!(c.region, "us-east-1");
        c.validate().unwrap();
    }

    #[test]
    fn unknown_fields_and_inline_secrets_are_refused() {
        let err = parse(r#"{"bucket": "b-1", "secret_access_key": "hunter2"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn invalid_fields_are_named() {
        type Breaker = fn(&mut S3Config);
        let cases: [(&str, Breaker); 7] = [
            ("bucket", |c| c.bucket = "ab".into()),
            ("bucket", |c| c.bucket = "Upper".into()),
            ("region", |c| c.region = String::new()),
            ("endpoint", |c| c.endpoint = Some("minio:9000".into())),
            ("prefix", |c| c.prefix = Some("/abs/".into())),
            ("prefix", |c| c.prefix = Some("no-slash".into())),
            ("secret_access_key_file", |c| {
                c.access_key_id_file = Some("/k".into())
            }),
        ];
        for (field, break_it) in cases {
            let mut c = S3Config::new("bucket-1");
            break_it(&mut c);
            match c.validate() {
                Err(S3ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn credentials_come_from_files_trimmed_and_the_secret_is_not_debug_printed() {
        let dir = tempfile::tempdir().unwrap();
        let (id, secret) = (dir.path().join("id"), dir.path().join("secret"));
        std::fs::write(&id, "AKIDEXAMPLE\n").unwrap();
        std::fs::write(&secret, "wJalrXUtnFEMI\n").unwrap();
        let mut c = S3Config::new("bucket-1");
        c.access_key_id_file = Some(id);
        c.secret_access_key_file = Some(secret.clone());
        let keys = c.credentials().unwrap();
        assert_eq!(keys.access_key_id, "AKIDEXAMPLE");
        assert_eq!(keys.secret_access_key, "wJalrXUtnFEMI");
        assert!(!format!("{keys:?}").contains("wJalrXUtnFEMI"));
        std::fs::write(&secret, "  \n").unwrap();
        assert!(
            matches!(c.credentials(), Err(S3ConfigError::Credentials(m)) if m.contains("empty"))
        );
    }
}
