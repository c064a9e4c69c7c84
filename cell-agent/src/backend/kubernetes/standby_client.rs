//! The agent's side of a warm pod's hand-off: `POST /v1/assign` to the standby in the pod
//! (`flotilla runner standby`, `crate::runner::standby`).
//!
//! HTTP/1.1 on the pod network, reachable only from the agent
//! (deploy/kubernetes/networkpolicy-runners.yaml). The body is the whole assignment,
//! checkout included, sealed with the pod's token (`crate::runner::sealed`): the token never
//! crosses the network, and nobody without it can read the job or pass one off.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;

/// Longest wait for a connection to the standby.
const CONNECT_WITHIN: Duration = Duration::from_secs(3);
/// Longest wait for the standby's answer (it answers before it starts the checkout).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// Most of an error body kept for the message.
const MAX_ERROR_BODY: usize = 512;

/// Why a job was not handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SendError {
    /// The standby answered and said no (another job, a wrong token, a bad spec): trying
    /// again cannot help.
    Refused(String),
    /// No connection: nothing was sent, worth another try.
    Unreachable(String),
    /// The request went out but no answer came: the standby may have taken the job.
    Unanswered(String),
}

/// Sends `body` (the assignment as JSON), sealed with `token`, to the standby at `ip:port`;
/// `Ok` once it accepted the job (202, also when it had accepted this very job before).
pub(super) async fn assign(ip: &str, port: u16, token: &str, body: &[u8]) -> Result<(), SendError> {
    let body = crate::runner::sealed::seal(token.as_bytes(), body)
        .map_err(|e| SendError::Refused(e.to_string()))?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|e| SendError::Refused(format!("the pod's IP `{ip}` is not an address: {e}")))?;
    let addr = SocketAddr::new(ip, port);
    let unreachable = |what: &str, e: &dyn std::fmt::Display| {
        SendError::Unreachable(format!("{what} {addr}: {e}"))
    };
    let stream = tokio::time::timeout(CONNECT_WITHIN, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| unreachable("timed out connecting to", &"no answer"))?
        .map_err(|e| unreachable("cannot connect to", &e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable("no HTTP from", &e))?;
    // The connection's driver lives only as long as this exchange.
    let driver = tokio::spawn(connection);
    let result = async {
        let request = http::Request::post("/v1/assign")
            .header(http::header::HOST, addr.to_string())
            .header(
                http::header::CONTENT_TYPE,
                crate::runner::sealed::CONTENT_TYPE,
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SendError::Refused(format!("cannot build the request: {e}")))?;
        // From here the standby may have the job, whatever happens to the answer.
        let unanswered = |what: &str, e: &dyn std::fmt::Display| {
            SendError::Unanswered(format!("{what} {addr}: {e}"))
        };
        let response = tokio::time::timeout(ANSWER_WITHIN, sender.send_request(request))
            .await
            .map_err(|_| unanswered("no answer from", &"timed out"))?
            .map_err(|e| unanswered("the request failed at", &e))?;
        let status = response.status();
        if status == http::StatusCode::ACCEPTED {
            return Ok(());
        }
        let text = match tokio::time::timeout(ANSWER_WITHIN, response.into_body().collect()).await {
            Ok(Ok(b)) => {
                let b = b.to_bytes();
                String::from_utf8_lossy(&b[..b.len().min(MAX_ERROR_BODY)]).into_owned()
            }
            _ => String::new(),
        };
        let why = format!("the standby answered {status}: {}", text.trim());
        // Whatever the status, the standby said it does not have the job (503: it is
        // shutting down and never will).
        Err(SendError::Refused(why))
    }
    .await;
    driver.abort();
    result
}
