//! The REST API client behind the operator and user commands (`flotilla cells …`, and more as
//! they land): where the API is (`--server` / `FLOTILLA_ADDR`), the token
//! (`--token` / `FLOTILLA_TOKEN`, or `--token-file`), and errors that say what to do.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Where the API is and how to authenticate, shared by every client command.
#[derive(Clone, clap::Args)]
pub(crate) struct ApiArgs {
    /// The federator's API URL.
    #[arg(
        long,
        env = "FLOTILLA_ADDR",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    server: String,
    /// An API token (prefer FLOTILLA_TOKEN or --token-file: a flag shows in `ps`).
    #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// A file holding the API token (`flotilla dev` writes `.flotilla/admin-token`).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
}

/// A connected client.
pub(crate) struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

// Tokens never reach a log or an error message.
impl std::fmt::Debug for ApiArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiArgs")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Whether `server` is this machine (where `flotilla dev`'s token file applies).
fn is_loopback(server: &str) -> bool {
    url::Url::parse(server).is_ok_and(|u| {
        matches!(
            u.host_str(),
            Some("127.0.0.1" | "localhost" | "[::1]" | "::1")
        )
    })
}

impl ApiArgs {
    /// The client these arguments describe.
    pub(crate) fn connect(&self) -> anyhow::Result<Api> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => t.trim().to_owned(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?
                .trim()
                .to_owned(),
            (None, None) => {
                // `flotilla dev`'s token, only for a server on this machine: never send it
                // anywhere else.
                let dev = PathBuf::from(".flotilla/admin-token");
                match std::fs::read_to_string(&dev)
                    .ok()
                    .filter(|_| is_loopback(&self.server))
                {
                    Some(t) => t.trim().to_owned(),
                    None => bail!(
                        "no API token: set FLOTILLA_TOKEN, or pass --token-file (flotilla dev \
                         writes one to .flotilla/admin-token)"
                    ),
                }
            }
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
            .context("loading the platform's trusted certificates")?;
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .user_agent(concat!("flotilla-cli/", env!("CARGO_PKG_VERSION")))
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            base: self.server.trim_end_matches('/').to_owned(),
            token,
            http,
        })
    }
}

impl Api {
    /// `GET path` (under `/api/v1`).
    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.send(self.http.get(self.url(path))).await
    }

    /// `POST path` with a JSON body.
    pub(crate) async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
    ) -> anyhow::Result<T> {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> anyhow::Result<T> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the Flotilla API at {} (is it running? set --server or FLOTILLA_ADDR)", self.base))?;
        let status = resp.status();
        let text = resp.text().await.context("reading the API's answer")?;
        if !status.is_success() {
            // Problem details (RFC 9457): the `detail` says what went wrong.
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["detail"].as_str().map(str::to_owned))
                .unwrap_or(text);
            bail!("{} ({status})", detail.trim());
        }
        serde_json::from_str(&text)
            .with_context(|| format!("the API answered something unexpected: {text}"))
    }
}
