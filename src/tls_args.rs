//! `--tls-cert/--tls-key/--tls-ca`: mutual TLS between replicas and for operator commands.

use std::path::PathBuf;

use anyhow::Context as _;
use flotilla_consensus::TlsConfig;

/// Mutual TLS for gRPC. Give all three or none; every replica of a cluster must agree.
/// Certificates must carry the advertised host as a subject alternative name and, if they
/// list extended key usages, both serverAuth and clientAuth.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct TlsArgs {
    /// PEM certificate chain (leaf first) presented to peers.
    #[arg(long, env = "FLOTILLA_TLS_CERT", requires_all = ["tls_key", "tls_ca"], global = true)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, env = "FLOTILLA_TLS_KEY", requires_all = ["tls_cert", "tls_ca"], global = true)]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle peers' certificates must chain to.
    #[arg(long, env = "FLOTILLA_TLS_CA", requires_all = ["tls_cert", "tls_key"], global = true)]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The private key file, if one is given.
    pub(crate) fn key_file(&self) -> Option<&PathBuf> {
        self.tls_key.as_ref()
    }

    /// The TLS configuration, if the flags ask for one.
    pub(crate) fn load(&self) -> anyhow::Result<Option<TlsConfig>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => TlsConfig::from_files(cert, key, ca)
                .map(Some)
                .context("loading the TLS certificates"),
            _ => Ok(None),
        }
    }
}
