//! [`KafkaConfig`]: which brokers, which topic, and the librdkafka properties passed through
//! for SASL and TLS (secrets from files, never inline).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The Kafka log stream's configuration.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// The bootstrap brokers, `host:port` each, at least one: the client learns the rest of
    /// the cluster from them.
    pub brokers: Vec<String>,
    /// The topic the log stream travels on. Flotilla does not create it: create it with as
    /// many partitions as aggregators may share the load (records are keyed by job, so one
    /// job's records always go to one partition), replication factor 3 and
    /// `min.insync.replicas=2`, so `acks=all` means two copies.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// More librdkafka properties (`CONFIGURATION.md` of librdkafka), given as they are to
    /// the producer and to every consumer: for SASL and TLS (`security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `ssl.ca.location`, …) or tuning
    /// (`message.timeout.ms`, `compression.type`, `session.timeout.ms`, …). Refused here:
    /// the properties the adapter's guarantees rest on (`bootstrap.servers`, `group.id`,
    /// `enable.idempotence`, `acks`, `max.in.flight.requests.per.connection`,
    /// `enable.auto.commit`, `enable.auto.offset.store`, `auto.offset.reset`,
    /// `allow.auto.create.topics`, `transactional.id`, …) and secrets (`sasl.password`, `ssl.key.password`, …: use
    /// [`Self::secret_files`]). This build has no OpenSSL (rdkafka's `ssl` feature), so TLS
    /// and the SASL mechanisms that need it (SCRAM) are refused when connecting; SASL PLAIN
    /// works.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
    /// librdkafka properties whose values are secrets, each read from a file when connecting
    /// (surrounding whitespace trimmed): `sasl.password = "/run/secrets/kafka-password"`.
    #[serde(default)]
    pub secret_files: BTreeMap<String, PathBuf>,
}

/// The default topic, `flotilla.logs`.
pub fn default_topic() -> String {
    "flotilla.logs".to_owned()
}

/// Properties the adapter sets itself: the order, durability and at-least-once guarantees
/// depend on them.
const MANAGED: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.partition.eof",
    "transactional.id",
    "allow.auto.create.topics",
];

/// Whether a property's value is a secret (redacted in `Debug`, refused in `extra`).
pub(super) fn is_secret(property: &str) -> bool {
    property.contains("password")
        || property.contains("secret")
        || property == "ssl.key.pem"
        || property == "ssl_key"
        || property == "sasl.oauthbearer.config"
}

/// What is wrong with a [`KafkaConfig`], or why the client could not be made from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KafkaConfigError {
    /// A field's value cannot be right.
    #[error("kafka.{field}: {why}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A secret file could not be read.
    #[error("kafka secret: {0}")]
    Secret(String),
    /// librdkafka refused the configuration (an unknown property, a value out of range, a
    /// feature this build lacks).
    #[error("kafka client: {0}")]
    Client(String),
}

impl KafkaConfig {
    /// A configuration for `brokers` with every other field at its default.
    pub fn new(brokers: impl IntoIterator<Item = impl Into<String>>) -> Self {
        KafkaConfig {
            brokers: brokers.into_iter().map(Into::into).collect(),
            topic: default_topic(),
            extra: BTreeMap::new(),
            secret_files: BTreeMap::new(),
        }
    }

    /// Checks every field; call before anything starts.
    pub fn validate(&self) -> Result<(), KafkaConfigError> {
        let invalid = |field, why: String| Err(KafkaConfigError::Invalid { field, why });
        if self.brokers.is_empty() {
            return invalid("brokers", "give at least one `host:port`".into());
        }
        for broker in &self.brokers {
            let port = broker
                .rsplit_once(':')
                .filter(|(host, _)| !host.is_empty())
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .filter(|&port| port != 0);
            if port.is_none() || broker.contains([',', ' ', '/']) {
                return invalid(
                    "brokers",
                    format!("`{broker}` is not a `host:port` (`kafka-0.kafka:9092`)"),
                );
            }
        }
        let t = &self.topic;
        if t.is_empty()
            || t.len() > 249
            || t == "."
            || t == ".."
            || !t
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
        {
            return invalid(
                "topic",
                format!("`{t}`: use 1 to 249 ASCII letters, digits, `.`, `_` and `-`"),
            );
        }
        for key in self.extra.keys() {
            if key.trim().is_empty() {
                return invalid("extra", "a property has an empty name".into());
            }
            if MANAGED.contains(&key.as_str()) {
                return invalid(
                    "extra",
                    format!("`{key}` is set by Flotilla: the log stream's guarantees rest on it"),
                );
            }
            if is_secret(key) {
                return invalid(
                    "extra",
                    format!("`{key}` is a secret: give a file holding it in secret_files"),
                );
            }
        }
        for (key, path) in &self.secret_files {
            if MANAGED.contains(&key.as_str()) || key.trim().is_empty() {
                return invalid(
                    "secret_files",
                    format!("`{key}` cannot be given (empty, or set by Flotilla)"),
                );
            }
            if self.extra.contains_key(key) {
                return invalid("secret_files", format!("`{key}` is also in extra"));
            }
            if path.as_os_str().is_empty() {
                return invalid("secret_files", format!("`{key}` has an empty path"));
            }
        }
        Ok(())
    }

    /// `extra` and the secrets read from their files: every property to pass through.
    pub(super) fn pass_through(&self) -> Result<Vec<(String, Secret)>, KafkaConfigError> {
        let mut properties: Vec<(String, Secret)> = self
            .extra
            .iter()
            .map(|(k, v)| (k.clone(), Secret(v.clone())))
            .collect();
        for (key, path) in &self.secret_files {
            properties.push((key.clone(), Secret(read_secret_file(path)?)));
        }
        Ok(properties)
    }
}

fn read_secret_file(path: &Path) -> Result<String, KafkaConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| KafkaConfigError::Secret(format!("reading {}: {e}", path.display())))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(KafkaConfigError::Secret(format!(
            "{} is empty",
            path.display()
        )));
    }
    Ok(value.to_owned())
}

/// A property value that may be secret, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Secret(pub(super) String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra: BTreeMap<&str, &str> = self
            .extra
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret(k) {
                    "<redacted>"
                } else {
                    v.as_str()
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("extra", &extra)
            .field("secret_files", &self.secret_files)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<KafkaConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn a_minimal_config_takes_the_default_topic_and_validates() {
        let c = parse(r#"{"brokers": ["kafka-0:9092", "[::1]:9093"]}"#).unwrap();
        assert_eq!(c, KafkaConfig::new(["kafka-0:9092", "[::1]:9093"]));
        assert_eq!(c.topic, "flotilla.logs");
        c.validate().unwrap();
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = parse(r#"{"brokers": ["k:9092"], "partitions": 3}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn invalid_fields_are_named() {
        type Breaker = fn(&mut KafkaConfig);
        let cases: [(&str, Breaker); 9] = [
            ("brokers", |c| c.brokers.clear()),
            ("brokers", |c| c.brokers = vec!["kafka-0".into()]),
            ("brokers", |c| c.brokers = vec!["kafka-0:0".into()]),
            ("brokers", |c| c.brokers = vec!["a:1,b:2".into()]),
            ("topic", |c| c.topic = "logs/all".into()),
            ("topic", |c| c.topic = String::new()),
            ("extra", |c| {
                c.extra.insert("acks".into(), "1".into());
            }),
            ("extra", |c| {
                c.extra.insert("sasl.password".into(), "hunter2".into());
            }),
            ("secret_files", |c| {
                c.secret_files.insert("group.id".into(), "/x".into());
            }),
        ];
        for (field, break_it) in cases {
            let mut c = KafkaConfig::new(["kafka-0:9092"]);
            break_it(&mut c);
            match c.validate() {
                Err(KafkaConfigError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn secrets_come_from_files_and_are_never_debug_printed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "hunter2\n").unwrap();
        let mut c = KafkaConfig::new(["kafka-0:9092"]);
        c.extra.insert("sasl.mechanism".into(), "PLAIN".into());
        c.secret_files.insert("sasl.password".into(), file.clone());
        c.validate().unwrap();
        let properties = c.pass_through().unwrap();
        assert!(properties.contains(&("sasl.password".into(), Secret("hunter2".into()))));
        assert!(!format!("{properties:?}").contains("hunter2"));
        // Even an unvalidated config with an inline secret does not show it.
        c.extra.insert("sasl.password".into(), "hunter2".into());
        assert!(!format!("{c:?}").contains("hunter2"));
        std::fs::write(&file, " \n").unwrap();
        c.extra.remove("sasl.password");
        assert!(
            matches!(c.pass_through(), Err(KafkaConfigError::Secret(m)) if m.contains("empty"))
        );
    }
}
