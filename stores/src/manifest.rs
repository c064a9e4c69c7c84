//! `manifest.json`: what both log adapters check before writing one, and how they read one
//! back. A manifest of another format version is refused, never reinterpreted.

use flotilla_core::store::{AttemptKey, LOG_FORMAT_VERSION, LogManifest, StoreError};

/// The layout key of an attempt's manifest: `logs/{project}/{build}/{job}/{attempt}/manifest.json`.
pub(crate) fn manifest_key(key: &AttemptKey) -> String {
    format!("{}manifest.json", key.log_prefix())
}

/// Checks a manifest about to be written and returns its JSON. Refused as
/// [`StoreError::Invalid`]: another version, a line count that disagrees with `last_seq`
/// (the log holds every line from 0 to `last_seq`), a malformed SHA-256, a chunk whose
/// range is backwards or past the last line.
pub(crate) fn encode(manifest: &LogManifest) -> Result<Vec<u8>, StoreError> {
    let invalid = |why: String| Err(StoreError::Invalid(format!("log manifest: {why}")));
    if manifest.v != LOG_FORMAT_VERSION {
        return invalid(format!(
            "version {} is not the supported {LOG_FORMAT_VERSION}",
            manifest.v
        ));
    }
    let expected_lines = manifest.last_seq.map_or(0, |last| last.saturating_add(1));
    if manifest.lines != expected_lines {
        return invalid(format!(
            "{} lines but the last line is {:?} (lines are numbered from 0 without gaps)",
            manifest.lines, manifest.last_seq
        ));
    }
    crate::sha::parse_declared(&manifest.sha256)?;
    if let Some(c) = manifest
        .chunks
        .iter()
        .find(|c| c.first_seq > c.last_seq || manifest.last_seq.is_none_or(|l| c.last_seq > l))
    {
        return invalid(format!(
            "chunk {}..={} is backwards or past the last line",
            c.first_seq, c.last_seq
        ));
    }
    serde_json::to_vec_pretty(manifest)
        .map_err(|e| StoreError::Invalid(format!("log manifest: {e}")))
}

/// Reads a stored manifest (`name` is its key, for errors).
pub(crate) fn decode(name: &str, bytes: &[u8]) -> Result<LogManifest, StoreError> {
    let manifest: LogManifest = serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("log manifest {name}: {e}")))?;
    if manifest.v != LOG_FORMAT_VERSION {
        return Err(StoreError::Corrupt(format!(
            "log manifest {name}: version {} is not the supported {LOG_FORMAT_VERSION}",
            manifest.v
        )));
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use flotilla_core::ids::Fence;
    use flotilla_core::store::ChunkRef;

    use super::*;

    fn manifest(lines: u64, last_seq: Option<u64>) -> LogManifest {
        LogManifest {
            v: LOG_FORMAT_VERSION,
            fence: Fence(3),
            lines,
            last_seq,
            sha256: crate::sha::of(b""),
            chunks: last_seq
                .map(|l| {
                    vec![ChunkRef {
                        first_seq: 0,
                        last_seq: l,
                        bytes: 10,
                    }]
                })
                .unwrap_or_default(),
        }
    }

    #[test]
    fn a_manifest_reads_back_as_written() {
        for m in [manifest(0, None), manifest(10, Some(9))] {
            assert_eq!(decode("k", &encode(&m).unwrap()).unwrap(), m);
        }
    }

    #[test]
    fn inconsistent_manifests_are_refused_and_other_versions_are_not_reinterpreted() {
        assert!(matches!(
            encode(&manifest(9, Some(9))),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            encode(&manifest(1, None)),
            Err(StoreError::Invalid(_))
        ));
        let mut past = manifest(5, Some(4));
        past.chunks[0].last_seq = 5;
        assert!(matches!(encode(&past), Err(StoreError::Invalid(_))));
        let mut v2 = manifest(0, None);
        v2.v = 2;
        assert!(matches!(encode(&v2), Err(StoreError::Invalid(_))));
        let json = serde_json::to_vec(&v2).unwrap();
        assert!(
            matches!(decode("k", &json), Err(StoreError::Corrupt(m)) if m.contains("version 2"))
        );
        assert!(matches!(decode("k", b"{\"v\":1"), Err(StoreError::Corrupt(m)) if m.contains("k")));
    }
}
