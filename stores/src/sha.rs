//! SHA-256 in the form the ports use (lowercase hex), and the check of a caller's declared
//! hash, so both artifact adapters agree on what a well-formed hash is.

use flotilla_core::store::StoreError;
use sha2::{Digest, Sha256};

/// A declared SHA-256, checked (64 hex digits) and lowercased.
pub(crate) fn parse_declared(sha256: &str) -> Result<String, StoreError> {
    if sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(sha256.to_ascii_lowercase())
    } else {
        Err(StoreError::Invalid(format!(
            "`{sha256}` is not a SHA-256 (64 hex digits)"
        )))
    }
}

/// The lowercase hex form of a finished hash.
pub(crate) fn finish(hasher: Sha256) -> String {
    hex::encode(hasher.finalize())
}

/// The SHA-256 of `bytes` in lowercase hex.
#[cfg(test)]
pub(crate) fn of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_hashes_are_lowercased_and_malformed_ones_refused() {
        let upper = "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855";
        assert_eq!(parse_declared(upper).unwrap(), of(b""));
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(65)] {
            assert!(
                matches!(parse_declared(bad), Err(StoreError::Invalid(_))),
                "{bad}"
            );
        }
    }
}
