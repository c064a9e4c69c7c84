//! `flotilla dev`: the whole product in one process on embedded defaults — a one-member
//! federator and local cells running jobs as sandboxed processes, every bit of state under
//! one data directory, so a restart on the same directory keeps every project and build.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use flotilla_cell_agent::backend::{LocalBackend, LocalConfig, SandboxMode};
use flotilla_cell_agent::{Agent, AgentAuth, AgentConfig};
use flotilla_core::ids::CellId;
use flotilla_federator::clock::SystemClock;
use flotilla_federator::config::FederatorConfig;
use flotilla_federator::repo::RoutedSource;
use flotilla_federator::service::{Deps, Federator, Listeners};

/// How jobs are isolated on this machine.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Sandbox {
    /// bubblewrap when installed, otherwise plain processes with a loud warning.
    Auto,
    /// bubblewrap or nothing: jobs fail rather than run unsandboxed.
    Required,
    /// Plain processes (trusted code only).
    Off,
}

impl From<Sandbox> for SandboxMode {
    fn from(s: Sandbox) -> Self {
        match s {
            Sandbox::Auto => SandboxMode::Auto,
            Sandbox::Required => SandboxMode::Required,
            Sandbox::Off => SandboxMode::Off,
        }
    }
}

/// Everything on one machine: a federator, `--cells` local cells, the API on `--http`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Where all state lives: Raft data, repository caches, workspaces, job logs, tokens.
    #[arg(long, default_value = ".flotilla")]
    data_dir: PathBuf,
    /// Address of the HTTP API, webhooks and metrics.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// How many local cells to run (`local-1`, `local-2`, …).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=32))]
    cells: u32,
    /// Jobs each cell runs at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    slots: u32,
    /// How job processes are isolated.
    #[arg(long, value_enum, default_value = "auto")]
    sandbox: Sandbox,
}

pub(crate) fn run(args: &Args) -> std::process::ExitCode {
    crate::block_on(true, serve(args))
}

/// Reads a token file, or creates it with a new random token (readable by the owner only).
fn token_file(path: &Path) -> anyhow::Result<String> {
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_owned();
        if !t.is_empty() {
            return Ok(t);
        }
    }
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness available: {e}"))?;
    let token = format!("flt_{}", hex::encode(bytes));
    let mut f = {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
        o.open(path)
    }
    .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{token}")?;
    Ok(token)
}

async fn serve(args: &Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            args.data_dir.display()
        )
    })?;
    let data = args
        .data_dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", args.data_dir.display()))?;
    let admin_token = token_file(&data.join("admin-token"))?;
    let cell_token = token_file(&data.join("cell-token"))?;

    let raft = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = tokio::net::TcpListener::bind(args.http).await.with_context(|| {
        format!(
            "cannot listen on {} (is another `flotilla dev` running? pick another address with --http)",
            args.http
        )
    })?;
    let cells = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut config = FederatorConfig::new(1, data.join("federator"));
    config.raft_listen = raft.local_addr()?;
    config.http_listen = http.local_addr()?;
    config.cluster.bootstrap = true;
    config.admin_token_file = Some(data.join("admin-token"));
    config.cells.bootstrap_token_file = Some(data.join("cell-token"));
    config.logs_dir = Some(data.join("logs"));
    let repos = RoutedSource::new(config.data_dir.join("repos"), &config.repos)
        .context("setting up repository access")?;
    let deps = Deps {
        clock: Arc::new(SystemClock),
        repos: Arc::new(repos),
        tls: None,
        cell_tls: None,
    };
    let listeners = Listeners {
        raft,
        http,
        cells: Some(cells),
    };
    let federator = Federator::start(config, listeners, deps).await?;
    federator
        .node()
        .wait_for_leader(Duration::from_secs(30))
        .await
        .context("the federator did not elect itself")?;
    let cells_addr = federator
        .cells_addr()
        .context("the cell service is not listening")?
        .to_string();

    let mut agents = Vec::new();
    let mut sandboxed = true;
    for i in 1..=args.cells {
        let id = format!("local-{i}");
        let mut local = LocalConfig::new(data.join("cells").join(&id));
        // Jobs must not read anything under the data directory: tokens, Raft data, other
        // jobs' workspaces.
        local.hidden_dirs = vec![data.clone()];
        local.sandbox = args.sandbox.into();
        let backend = LocalBackend::new(local).with_context(|| format!("starting cell {id}"))?;
        sandboxed &= backend.sandboxed();
        let mut agent = AgentConfig::new(
            CellId::new(&id)?,
            vec![cells_addr.clone()],
            AgentAuth::Token(cell_token.clone()),
            data.join("logs"),
        );
        agent.pools = [(flotilla_core::state::DEFAULT_POOL.to_owned(), args.slots)].into();
        agents.push(Agent::start(agent, Arc::new(backend)));
    }

    let url = format!("http://{}", federator.http_addr());
    let sandbox = if sandboxed {
        "bubblewrap sandbox"
    } else {
        "NOT sandboxed (install bubblewrap)"
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "Flotilla dev is running.")?;
    writeln!(
        out,
        "  API:         {url}/api/v1  (OpenAPI: {url}/api/v1/openapi.json)"
    )?;
    writeln!(out, "  Admin token: {admin_token}")?;
    writeln!(
        out,
        "               (saved in {})",
        data.join("admin-token").display()
    )?;
    writeln!(
        out,
        "  Cells:       {} local ({} jobs each, {sandbox})",
        args.cells, args.slots
    )?;
    writeln!(out, "  Data:        {}", data.display())?;
    writeln!(
        out,
        "Try:  curl -H 'Authorization: Bearer {admin_token}' {url}/api/v1/cells"
    )?;
    writeln!(out, "Press Ctrl-C to stop.")?;
    out.flush()?;
    drop(out);

    crate::shutdown_signal().await;
    tracing::info!("Shutting down: stopping cells, then the federator.");
    for a in agents {
        a.shutdown().await;
    }
    federator.shutdown().await;
    Ok(())
}
