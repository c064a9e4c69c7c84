//! `flotilla cell-agent`: the agent of one cell, with the local runner backend (the
//! Kubernetes backend arrives with its own issue).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use flotilla_cell_agent::backend::{LocalBackend, LocalConfig};
use flotilla_cell_agent::{Agent, AgentAuth, AgentConfig};
use flotilla_core::ids::CellId;

/// One cell's agent. It dials any federator replica's cell service (`--federator`, repeat
/// for several), follows leader hints, and runs what it is assigned.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The cell's id: a DNS label, unique in the installation, stable across restarts.
    #[arg(long)]
    cell: String,
    /// Cell-session address (`host:port`) of a federator replica; repeat for several.
    #[arg(long = "federator", required = true)]
    federators: Vec<String>,
    /// The cell's region, matched by jobs' `placement.region`.
    #[arg(long, default_value = "local")]
    region: String,
    /// A label `key=value`, matched by jobs' `placement.labels`; repeat for several.
    #[arg(long = "label", value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// A runner pool `name=size` (most jobs at once); repeat for several.
    #[arg(long = "pool", value_parser = pool, default_value = "default=4")]
    pools: Vec<(String, u32)>,
    /// Where workspaces, git mirrors and job logs live.
    #[arg(long, default_value = ".flotilla/cell-agent")]
    data_dir: PathBuf,
    /// A file holding the federator's cell bootstrap token (when not using mutual TLS).
    #[arg(long, env = "FLOTILLA_CELL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The name the federator's certificate is checked against (default: the host dialled).
    #[arg(long)]
    server_name: Option<String>,
    /// How job processes are isolated.
    #[arg(long, value_enum, default_value = "auto")]
    sandbox: crate::dev::Sandbox,
    #[command(flatten)]
    tls: crate::tls_args::TlsArgs,
}

fn key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{s}` is not `key=value`"))
}

fn pool(s: &str) -> Result<(String, u32), String> {
    let (name, size) = key_value(s)?;
    let size = size
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("the size in `{s}` must be a positive number"))?;
    Ok((name, size))
}

/// The files holding the agent's secrets.
fn credential_files(args: &Args) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = args.token_file.iter().cloned().collect();
    files.extend(args.tls.key_file().cloned());
    files
}

/// The directory of a credential file, which the sandbox hides. Refused when it is a
/// directory jobs need (such as `/etc`): keep credentials in a directory of their own.
fn credential_dir(file: &std::path::Path) -> anyhow::Result<PathBuf> {
    let dir = file
        .canonicalize()
        .with_context(|| format!("cannot read {}", file.display()))?
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let shared = [
        "/", "/etc", "/root", "/home", "/usr", "/var", "/tmp", "/opt", "/srv",
    ];
    if shared.iter().any(|s| dir == std::path::Path::new(s)) {
        bail!(
            "{} is in {}, which jobs must be able to read; move the agent's credentials into a \
             directory of their own (such as /etc/flotilla-agent/), which the sandbox hides",
            file.display(),
            dir.display()
        );
    }
    Ok(dir)
}

pub(crate) fn run(args: &Args) -> std::process::ExitCode {
    crate::block_on(true, serve(args))
}

async fn serve(args: &Args) -> anyhow::Result<()> {
    let cell = CellId::new(&args.cell)?;
    let auth = match (args.tls.load()?, &args.token_file) {
        (Some(tls), None) => AgentAuth::Tls {
            cert_chain_pem: tls.cert_chain_pem,
            private_key_pem: tls.private_key_pem,
            ca_pem: tls.ca_pem,
            server_name: args.server_name.clone(),
        },
        (None, Some(path)) => AgentAuth::Token(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        (Some(_), Some(_)) => bail!("use either --tls-* or --token-file, not both"),
        (None, None) => bail!(
            "the agent must authenticate: --tls-cert/--tls-key/--tls-ca (a certificate naming the cell) or --token-file"
        ),
    };
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create {}", args.data_dir.display()))?;
    let data = args.data_dir.canonicalize()?;
    let mut local = LocalConfig::new(&data);
    local.sandbox = args.sandbox.into();
    // Jobs run as the agent's user on a read-only view of the host: the directories holding
    // the agent's credentials must be hidden from them, or a job could connect as this cell.
    for file in credential_files(args) {
        local.hidden_dirs.push(credential_dir(&file)?);
    }
    let backend = LocalBackend::new(local).context("starting the local runner backend")?;
    let mut config = AgentConfig::new(cell, args.federators.clone(), auth, data.join("logs"));
    config.region = args.region.clone();
    config.labels = args.labels.iter().cloned().collect::<BTreeMap<_, _>>();
    config.pools = args.pools.iter().cloned().collect();
    tracing::info!(cell = %config.cell, sandboxed = backend.sandboxed(), "Cell agent starting.");
    let agent = Agent::start(config, Arc::new(backend));
    crate::shutdown_signal().await;
    tracing::info!(
        "Shutting down: killing runners; their jobs are re-placed once the cell's lease runs out."
    );
    agent.shutdown().await;
    Ok(())
}
