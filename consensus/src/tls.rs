//! Mutual TLS between replicas, and for clients of the admin service: rustls with the ring
//! provider, through tonic.
//!
//! With a [`TlsConfig`], a replica's gRPC server (Raft and admin services alike) requires every
//! client to present a certificate that chains to the configured CA bundle, and every client
//! this crate makes — replication, forwarded proposals, [`crate::join_cluster_tls`],
//! [`crate::admin_client`] — presents the replica's own certificate and verifies the server's
//! against the same bundle. So one certificate per replica serves both directions, and must
//! allow both uses: if it carries an extended key usage extension, that must list
//! `serverAuth` and `clientAuth`.
//!
//! Peer addresses stay `host:port` (as stored in the membership). A client verifies the server
//! certificate against [`TlsConfig::server_name`] when set, otherwise against the host part
//! of the address it dials: a replica's certificate must carry its advertised host as a
//! subject alternative name — a DNS name, or an IP address SAN such as `127.0.0.1` for a
//! replica advertising `127.0.0.1:7400`.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// How long a TLS handshake may take, on either side.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A replica's TLS identity and the CA it trusts, all PEM-encoded.
///
/// Build it with [`TlsConfig::from_pem`] or [`TlsConfig::from_files`] (both validate), or set
/// the fields directly; [`crate::Node::start`] validates it again before serving.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// This replica's certificate, then any intermediates, PEM.
    pub cert_chain_pem: Vec<u8>,
    /// The certificate's private key, PEM (PKCS#8, PKCS#1 or SEC1). Redacted in `Debug`.
    pub private_key_pem: Vec<u8>,
    /// The CA certificates (one or more, PEM) that peers' certificates — server and client —
    /// must chain to. Usually a private CA for the cluster alone: any certificate it signed
    /// is admitted as a replica or an operator.
    pub ca_pem: Vec<u8>,
    /// The name a server's certificate is checked against. `None` (the default): the host part
    /// of the address dialled, so each replica's certificate must name its advertised host.
    /// Set it when every replica's certificate carries one shared name instead.
    pub server_name: Option<String>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field(
                "cert_chain_pem",
                &format_args!("{} bytes", self.cert_chain_pem.len()),
            )
            .field("private_key_pem", &"<redacted>")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// Why a TLS configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("cannot read the TLS {what} from {path}: {source}")]
    Read {
        /// Which file: "certificate chain", "private key" or "CA bundle".
        what: &'static str,
        /// The path given.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// PEM data did not hold what it should.
    #[error("invalid TLS {what}: {reason}")]
    Invalid {
        /// Which part: "certificate chain", "private key", "CA bundle" or "server name".
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl TlsError {
    /// Never: a configuration problem stays until someone fixes the files.
    pub fn is_retryable(&self) -> bool {
        false
    }

    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            TlsError::Read { .. } => "read",
            TlsError::Invalid { .. } => "invalid",
        }
    }
}

impl TlsConfig {
    /// A configuration from PEM bytes: this replica's certificate chain and private key, and
    /// the CA bundle peers must chain to. Validated.
    pub fn from_pem(
        cert_chain_pem: impl Into<Vec<u8>>,
        private_key_pem: impl Into<Vec<u8>>,
        ca_pem: impl Into<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        let config = Self {
            cert_chain_pem: cert_chain_pem.into(),
            private_key_pem: private_key_pem.into(),
            ca_pem: ca_pem.into(),
            server_name: None,
        };
        config.validate()?;
        Ok(config)
    }

    /// [`TlsConfig::from_pem`] with the PEM read from files.
    pub fn from_files(
        cert_chain: impl AsRef<Path>,
        private_key: impl AsRef<Path>,
        ca: impl AsRef<Path>,
    ) -> Result<Self, TlsError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                what,
                path: path.display().to_string(),
                source,
            })
        };
        Self::from_pem(
            read("certificate chain", cert_chain.as_ref())?,
            read("private key", private_key.as_ref())?,
            read("CA bundle", ca.as_ref())?,
        )
    }

    /// Verifies every server's certificate against `name` instead of the host dialled.
    pub fn with_server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Checks that the PEM parses: at least one certificate in the chain and in the CA
    /// bundle, a private key, and a usable server name if one is set.
    pub fn validate(&self) -> Result<(), TlsError> {
        let invalid = |what, reason: String| TlsError::Invalid { what, reason };
        let certs = |what, pem: &[u8]| -> Result<(), TlsError> {
            let n = CertificateDer::pem_slice_iter(pem)
                .try_fold(0usize, |n, c| c.map(|_| n + 1))
                .map_err(|e| invalid(what, e.to_string()))?;
            if n == 0 {
                return Err(invalid(what, "no PEM CERTIFICATE block found".into()));
            }
            Ok(())
        };
        certs("certificate chain", &self.cert_chain_pem)?;
        certs("CA bundle", &self.ca_pem)?;
        PrivateKeyDer::from_pem_slice(&self.private_key_pem)
            .map_err(|e| invalid("private key", e.to_string()))?;
        if let Some(name) = &self.server_name {
            ServerName::try_from(name.as_str())
                .map_err(|e| invalid("server name", format!("{name:?}: {e}")))?;
        }
        Ok(())
    }

    /// The server side: present our certificate, require and verify the client's.
    pub(crate) fn server(&self) -> ServerTlsConfig {
        ensure_crypto_provider();
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(false)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// The client side towards `addr`: present our certificate, verify the server's.
    fn client(&self, addr: &str) -> ClientTlsConfig {
        ensure_crypto_provider();
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| host_of(addr).to_owned());
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(self.identity())
            .domain_name(name)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_chain_pem, &self.private_key_pem)
    }
}

/// An endpoint for the replica at `addr` (`host:port`): `https` with our client identity when
/// `tls` is set, plain `http` otherwise. Nothing is dialled yet.
pub(crate) fn endpoint(addr: &str, tls: Option<&TlsConfig>) -> Result<Endpoint, String> {
    let bad = |e: tonic::transport::Error| format!("bad replica address {addr}: {e}");
    match tls {
        None => Endpoint::from_shared(format!("http://{addr}")).map_err(bad),
        // tonic only does TLS for `https` URIs: an `http` one with a TLS config would quietly
        // go out in plain text.
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))
            .and_then(|e| e.tls_config(tls.client(addr)))
            .map_err(bad),
    }
}

/// The host part of `host:port`, `[v6]:port`, or a bare host.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(host, _)| host);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => addr,
    }
}

/// rustls needs a process-wide crypto provider when more than one is compiled in (as happens
/// when other crates in the same binary enable aws-lc). Install ring unless the application
/// chose one already.
fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: some provider is then in place.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_taken_from_every_address_form() {
        assert_eq!(host_of("127.0.0.1:7400"), "127.0.0.1");
        assert_eq!(host_of("federator-0.example:7400"), "federator-0.example");
        assert_eq!(host_of("[::1]:7400"), "::1");
        assert_eq!(host_of("federator-0"), "federator-0");
        assert_eq!(host_of("::1"), "::1");
    }

    #[test]
    fn garbage_pem_is_refused_with_the_part_named() {
        let e = TlsConfig::from_pem("not pem", "not pem", "not pem").unwrap_err();
        assert!(
            e.to_string().contains("certificate chain"),
            "unexpected error: {e}"
        );
    }

    #[test]
    fn the_private_key_is_not_printed() {
        let c = TlsConfig {
            cert_chain_pem: Vec::new(),
            private_key_pem: b"-----BEGIN PRIVATE KEY-----secret".to_vec(),
            ca_pem: Vec::new(),
            server_name: None,
        };
        assert!(!format!("{c:?}").contains("secret"));
    }
}
