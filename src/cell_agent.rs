//! `flotilla cell-agent`: the agent of one cell, with the `local` backend (sandboxed
//! processes) or the `kubernetes` backend (one pod per attempt), and `render-pod`, which
//! prints the pod the Kubernetes backend would create for a job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use flotilla_cell_agent::backend::kubernetes::{self, KubeBackend, render};
use flotilla_cell_agent::backend::{LocalBackend, LocalConfig, SandboxMode};
use flotilla_cell_agent::config::{AgentFile, AuthFile, BackendFile};
use flotilla_cell_agent::{Agent, AgentAuth, AgentConfig};
use flotilla_consensus::TlsConfig;
use flotilla_core::ids::CellId;
use flotilla_core::runner::{Assignment, RunnerBackend};

/// One cell's agent. Configure it with `--config FILE` (YAML; the way to run the kubernetes
/// backend, see deploy/kubernetes/agent-config.yaml) or, for the local backend, with flags.
/// It dials any federator replica's cell service, follows leader hints, and runs what it is
/// assigned.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Option<AgentCommand>,
    /// Read the whole configuration from this YAML file (no other flags allowed with it).
    #[arg(long, conflicts_with_all = ["cell", "federators", "region", "labels", "pools", "data_dir", "token_file", "server_name", "sandbox"])]
    config: Option<PathBuf>,
    /// The cell's id: a DNS label, unique in the installation, stable across restarts.
    #[arg(long, required_unless_present = "config")]
    cell: Option<String>,
    /// Cell-session address (`host:port`) of a federator replica; repeat for several.
    #[arg(long = "federator", required_unless_present = "config")]
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
    /// How job processes are isolated (local backend).
    #[arg(long, value_enum, default_value = "auto")]
    sandbox: crate::dev::Sandbox,
    #[command(flatten)]
    tls: crate::tls_args::TlsArgs,
}

#[derive(Debug, clap::Subcommand)]
enum AgentCommand {
    /// Print the Pod (YAML) the kubernetes backend would create for a resolved job spec,
    /// for review and policy tests, like `helm template`. Nothing is sent to a cluster.
    ///
    /// The job spec is the JSON (or YAML) the agent mounts into every runner pod as
    /// `/flotilla/spec/job.json`; deploy/job-spec.example.yaml is one to start from. The pod
    /// follows the `backend.kubernetes` section of `--config` (defaults without it).
    ///
    /// Example: flotilla cell-agent render-pod --job deploy/job-spec.example.yaml --config agent.yaml
    RenderPod(RenderArgs),
}

#[derive(Debug, clap::Args)]
struct RenderArgs {
    /// The resolved job spec (JSON or YAML).
    #[arg(long)]
    job: PathBuf,
    /// The agent's configuration file; its `cell` and `backend.kubernetes` shape the pod.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The cell id the pod is labelled with (default: the config's, else `cell`).
    #[arg(long)]
    cell: Option<String>,
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

/// The directory of a credential file, which the sandbox hides. Refused when it is a
/// directory jobs need (such as `/etc`): keep credentials in a directory of their own.
fn credential_dir(file: &Path) -> anyhow::Result<PathBuf> {
    let dir = file
        .canonicalize()
        .with_context(|| format!("cannot read {}", file.display()))?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let shared = [
        "/", "/etc", "/root", "/home", "/usr", "/var", "/tmp", "/opt", "/srv",
    ];
    if shared.iter().any(|s| dir == Path::new(s)) {
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
    match &args.command {
        Some(AgentCommand::RenderPod(render_args)) => match render_pod(render_args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => crate::fail(&e),
        },
        None => crate::block_on(true, serve(args)),
    }
}

/// Everything the agent needs, from the file or the flags.
struct Setup {
    file: AgentFile,
    /// Credential files (their directories are hidden from local jobs).
    credentials: Vec<PathBuf>,
    auth: AgentAuth,
}

fn setup_from(args: &Args) -> anyhow::Result<Setup> {
    if let Some(path) = &args.config {
        let file = read_agent_file(path)?;
        let (auth, credentials) = match &file.auth {
            AuthFile::Tls {
                cert,
                key,
                ca,
                server_name,
            } => {
                let tls = TlsConfig::from_files(cert, key, ca)
                    .context("loading the agent's TLS certificates")?;
                (
                    AgentAuth::Tls {
                        cert_chain_pem: tls.cert_chain_pem,
                        private_key_pem: tls.private_key_pem,
                        ca_pem: tls.ca_pem,
                        server_name: server_name.clone(),
                    },
                    vec![key.clone()],
                )
            }
            AuthFile::TokenFile(path) => (AgentAuth::Token(read_token(path)?), vec![path.clone()]),
        };
        return Ok(Setup {
            file,
            credentials,
            auth,
        });
    }
    let mut credentials: Vec<PathBuf> = args.token_file.iter().cloned().collect();
    credentials.extend(args.tls.key_file().cloned());
    let auth = match (args.tls.load()?, &args.token_file) {
        (Some(tls), None) => AgentAuth::Tls {
            cert_chain_pem: tls.cert_chain_pem,
            private_key_pem: tls.private_key_pem,
            ca_pem: tls.ca_pem,
            server_name: args.server_name.clone(),
        },
        (None, Some(path)) => AgentAuth::Token(read_token(path)?),
        (Some(_), Some(_)) => bail!("use either --tls-* or --token-file, not both"),
        (None, None) => bail!(
            "the agent must authenticate: --tls-cert/--tls-key/--tls-ca (a certificate naming the cell) or --token-file"
        ),
    };
    let file = AgentFile {
        cell: args.cell.clone().context("--cell is required")?,
        region: args.region.clone(),
        labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        pools: args
            .pools
            .iter()
            .map(|(name, n)| {
                (
                    name.clone(),
                    flotilla_cell_agent::config::PoolFile::Size(*n),
                )
            })
            .collect(),
        federators: args.federators.clone(),
        data_dir: args.data_dir.clone(),
        // Flags describe a local agent; the file is how a kubernetes agent is configured.
        auth: AuthFile::TokenFile(PathBuf::new()),
        backend: BackendFile::Local(flotilla_cell_agent::config::LocalFile {
            sandbox: match args.sandbox {
                crate::dev::Sandbox::Auto => flotilla_cell_agent::config::SandboxFile::Auto,
                crate::dev::Sandbox::Required => flotilla_cell_agent::config::SandboxFile::Required,
                crate::dev::Sandbox::Off => flotilla_cell_agent::config::SandboxFile::Off,
            },
        }),
    };
    file.validate().map_err(anyhow::Error::msg)?;
    Ok(Setup {
        file,
        credentials,
        auth,
    })
}

fn read_agent_file(path: &Path) -> anyhow::Result<AgentFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    AgentFile::from_yaml(&path.display().to_string(), &text).map_err(anyhow::Error::msg)
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the token file {}", path.display()))?
        .trim()
        .to_owned())
}

async fn serve(args: &Args) -> anyhow::Result<()> {
    let Setup {
        file,
        credentials,
        auth,
    } = setup_from(args)?;
    let cell = CellId::new(&file.cell)?;
    std::fs::create_dir_all(&file.data_dir)
        .with_context(|| format!("cannot create {}", file.data_dir.display()))?;
    let data = file.data_dir.canonicalize()?;
    let backend: Arc<dyn RunnerBackend> = match &file.backend {
        BackendFile::Local(local_file) => {
            let mut local = LocalConfig::new(&data);
            local.sandbox = SandboxMode::from(local_file.sandbox);
            // Jobs run as the agent's user on a read-only view of the host: the directories
            // holding the agent's credentials must be hidden from them, or a job could
            // connect as this cell.
            for file in &credentials {
                local.hidden_dirs.push(credential_dir(file)?);
            }
            let backend = LocalBackend::new(local).context("starting the local runner backend")?;
            tracing::info!(cell = %cell, sandboxed = backend.sandboxed(), "Cell agent starting with the local backend.");
            Arc::new(backend)
        }
        BackendFile::Kubernetes(kube_config) => {
            let client = kubernetes::client::connect(kube_config)
                .await
                .context("connecting to the Kubernetes API server (in-cluster service account, or KUBECONFIG)")?;
            let backend = KubeBackend::with_pools(
                client,
                (**kube_config).clone(),
                cell.clone(),
                file.pool_pods(),
            )
            .context("starting the kubernetes runner backend")?;
            tracing::info!(cell = %cell, namespace = %kube_config.namespace, "Cell agent starting with the kubernetes backend.");
            Arc::new(backend)
        }
    };
    let mut config = AgentConfig::new(cell, file.federators.clone(), auth, data.join("logs"));
    config.region = file.region.clone();
    config.labels = file.labels.clone();
    config.pools = file.pool_sizes();
    config.autoscale = file.autoscale();
    config.pool_resources = file.pool_resources();
    config.history_file = Some(data.join("demand-history.json"));
    let agent = Agent::start(config, backend);
    crate::shutdown_signal().await;
    tracing::info!(
        "Shutting down: local runners are killed and their jobs re-placed once the cell's lease runs out; pods keep running for the next agent."
    );
    agent.shutdown().await;
    Ok(())
}

fn render_pod(args: &RenderArgs) -> anyhow::Result<()> {
    let (file_cell, kube_config) = match &args.config {
        Some(path) => {
            let file = read_agent_file(path)?;
            let BackendFile::Kubernetes(k) = file.backend else {
                bail!(
                    "{} configures the local backend; render-pod needs a `backend: kubernetes:` section",
                    path.display()
                );
            };
            (Some(file.cell), k)
        }
        None => (None, Box::default()),
    };
    let cell = CellId::new(
        args.cell
            .clone()
            .or(file_cell)
            .unwrap_or_else(|| "cell".into()),
    )?;
    let text = std::fs::read_to_string(&args.job)
        .with_context(|| format!("cannot read {}", args.job.display()))?;
    let name = args.job.display().to_string();
    let job: Assignment = render::read_job_spec(&name, &text).map_err(anyhow::Error::msg)?;
    let pod = render::pod(&kube_config, &cell, &job);
    let problems = render::restricted_violations(&pod);
    if !problems.is_empty() {
        bail!(
            "the rendered pod breaks Pod Security \"restricted\":\n  {}",
            problems.join("\n  ")
        );
    }
    if kube_config.runtime_class.is_none() {
        tracing::warn!("runtime_class is null: this pod would run without gVisor.");
    }
    #[allow(
        clippy::print_stdout,
        reason = "the rendered pod is the command's output"
    )]
    {
        print!("{}", render::to_yaml(&pod));
    }
    Ok(())
}
