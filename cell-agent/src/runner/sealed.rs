//! Sealing a warm pod's job for the trip from the agent to the pod's standby: the
//! assignment (whose clone URL may carry credentials) is encrypted and authenticated with a
//! key only the agent and that pod's standby hold — the pod's random token, from its Secret.
//!
//! Why not a bearer token over plain HTTP: the pod network is not trusted to keep secrets,
//! and after the hand-off the pod runs job code that could listen on the standby's port; a
//! job that received a sealed request (an agent sending again after a restart, say) learns
//! nothing from it. Opening proves the sender holds the token, so it is the standby's
//! authentication as well.
//!
//! Format: `nonce (12 bytes) || ChaCha20-Poly1305(key = SHA-256(token), aad = "flotilla
//! warm assign v1") of the JSON assignment, with its 16-byte tag`.

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::digest::{SHA256, digest};

/// The request body's content type.
pub const CONTENT_TYPE: &str = "application/vnd.flotilla.sealed-assignment";

const AAD: &[u8] = b"flotilla warm assign v1";

/// Why a sealed body could not be made or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Not sealed with this token (or altered on the way).
    #[error("the body was not sealed with this runner's token")]
    WrongKey,
    /// No randomness for a nonce.
    #[error("no randomness for a nonce: {0}")]
    Random(String),
}

fn key(token: &[u8]) -> LessSafeKey {
    let hash = digest(&SHA256, token);
    let unbound =
        UnboundKey::new(&CHACHA20_POLY1305, hash.as_ref()).expect("a SHA-256 is a 32-byte key");
    LessSafeKey::new(unbound)
}

/// Seals `plaintext` for the holder of `token`.
pub fn seal(token: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| SealError::Random(e.to_string()))?;
    let mut body = Vec::with_capacity(NONCE_LEN + plaintext.len() + 16);
    body.extend_from_slice(&nonce);
    let mut sealed = plaintext.to_vec();
    key(token)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(AAD),
            &mut sealed,
        )
        .map_err(|_| SealError::WrongKey)?;
    body.extend_from_slice(&sealed);
    Ok(body)
}

/// Opens a body [`seal`] made with `token`.
pub fn open(token: &[u8], body: &[u8]) -> Result<Vec<u8>, SealError> {
    let Some((nonce, sealed)) = body.split_at_checked(NONCE_LEN) else {
        return Err(SealError::WrongKey);
    };
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::WrongKey)?;
    let mut sealed = sealed.to_vec();
    let plain = key(token)
        .open_in_place(nonce, Aad::from(AAD), &mut sealed)
        .map_err(|_| SealError::WrongKey)?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_tokens_holder_can_open_what_was_sealed_for_it() {
        let body = seal(b"token-a", b"{\"job\":1}").expect("sealed");
        assert!(
            !body.windows(7).any(|w| w == b"\"job\":1"),
            "the job is not readable on the wire"
        );
        assert_eq!(open(b"token-a", &body).expect("opened"), b"{\"job\":1}");
        assert_eq!(open(b"token-b", &body), Err(SealError::WrongKey));
        let mut altered = body.clone();
        *altered.last_mut().expect("bytes") ^= 1;
        assert_eq!(open(b"token-a", &altered), Err(SealError::WrongKey));
        assert_eq!(open(b"token-a", &body[..5]), Err(SealError::WrongKey));
        assert_ne!(
            seal(b"token-a", b"x").expect("sealed"),
            seal(b"token-a", b"x").expect("sealed"),
            "a fresh nonce each time"
        );
    }
}
