//! `botcreds-agent`: `run` the agent, or ask a running one for its `status`.

use std::path::PathBuf;
use std::process::ExitCode;

use botcreds_agent::broker_client::{API_KEY_ENV, Auth};
use botcreds_agent::config::{AuthConfig, Config};
use botcreds_agent::status;
use botcreds_proto::agent::{DEFAULT_SOCKET, SOCKET_ENV};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "botcreds-agent",
    version,
    about = "Keeps this host's botcreds credentials fresh and serves them to git"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (logs to stderr; stop with SIGTERM or SIGINT).
    Run {
        /// The agent's configuration file.
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
    },
    /// Show the running agent's credentials, broker reachability and errors.
    Status {
        /// Read the socket path from this configuration file.
        #[arg(long, value_name = "PATH", conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The agent's socket (default: $BOTCREDS_AGENT_SOCKET, else /run/botcreds/agent.sock).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Enroll this host for mTLS: make a key pair here (the private key never leaves the
    /// host) and trade a one-time join token for a client certificate.
    Enroll {
        /// The broker's URL where `/v1/enroll` is served (its tailnet or loopback listener).
        #[arg(long)]
        broker: String,
        /// The join token from `botcreds enroll create` (or $BOTCREDS_JOIN_TOKEN).
        #[arg(long, env = "BOTCREDS_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// The bot to enroll as (default: the bot the token is for).
        #[arg(long)]
        bot: Option<String>,
        /// Where to keep key, certificate and CA bundle (default: state_dir of --config, else
        /// /var/lib/botcreds).
        #[arg(long, value_name = "PATH")]
        state_dir: Option<PathBuf>,
        /// Read state_dir from this agent.toml.
        #[arg(long, value_name = "PATH", conflicts_with = "state_dir")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config),
        Command::Status {
            config,
            socket,
            json,
        } => show_status(config, socket, json),
        Command::Enroll {
            broker,
            token,
            bot,
            state_dir,
            config,
        } => enroll(&broker, &token, bot.as_deref(), state_dir, config),
    }
}

fn run(path: PathBuf) -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Plain text unless a person watches: the readiness line is parsed by tests and scripts.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    // The handlers go in before anything else happens: a SIGTERM while the configuration is
    // read or the socket is bound is then a clean stop once `run` is up (keys released, socket
    // removed), not the default action that kills the process on the spot.
    let shutdown = match runtime.block_on(async { ShutdownSignals::install() }) {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot install the signal handlers: {e}")),
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    let auth = match Auth::load(&config.auth, std::env::var(API_KEY_ENV).ok())
        .and_then(|a| a.trusting(&config.server_trust))
    {
        Ok(a) => a,
        Err(e) => return fail(&e.to_string()),
    };
    match runtime.block_on(botcreds_agent::run(config, auth, shutdown.received())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}

/// SIGTERM and SIGINT, caught from the moment [`ShutdownSignals::install`] returns; one that
/// arrives before anyone waits is kept and ends the wait at once.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Installs the handlers (inside a runtime).
    fn install() -> std::io::Result<ShutdownSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the first SIGTERM or SIGINT since [`ShutdownSignals::install`].
    async fn received(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

fn enroll(
    broker: &str,
    token: &str,
    bot: Option<&str>,
    state_dir: Option<PathBuf>,
    config: Option<PathBuf>,
) -> ExitCode {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let state_dir = match (state_dir, config) {
        (Some(dir), _) => dir,
        (None, Some(path)) => match Config::load(&path) {
            Ok(c) => match c.auth {
                AuthConfig::Mtls(dir) => dir,
                _ => botcreds_agent::tls::DEFAULT_STATE_DIR.into(),
            },
            Err(e) => return fail(&e.to_string()),
        },
        (None, None) => botcreds_agent::tls::DEFAULT_STATE_DIR.into(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(botcreds_agent::enroll::enroll(
        broker, token, bot, &state_dir,
    )) {
        Ok(identity) => {
            println!(
                "enrolled: {}
stored in {} (client.pem 0600, ca.pem)
                 In agent.toml set auth = \"mtls\", state_dir = \"{}\" and broker = the \
                 broker's https:// mTLS listener.",
                identity.info.describe(),
                state_dir.display(),
                state_dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e.to_string()),
    }
}

fn show_status(config: Option<PathBuf>, socket: Option<PathBuf>, json: bool) -> ExitCode {
    let mut mtls_dir = None;
    let socket = match (config, socket) {
        (_, Some(socket)) => socket,
        (Some(path), None) => match Config::load(&path) {
            Ok(c) => {
                if let AuthConfig::Mtls(dir) = &c.auth {
                    mtls_dir = Some(dir.clone());
                }
                c.socket
            }
            Err(e) => return fail(&e.to_string()),
        },
        (None, None) => {
            std::env::var_os(SOCKET_ENV).map_or_else(|| DEFAULT_SOCKET.into(), PathBuf::from)
        }
    };
    match status::fetch(&socket) {
        Ok((_, raw)) if json => {
            println!("{}", raw.trim_end());
            ExitCode::SUCCESS
        }
        Ok((s, _)) => {
            print!("{}", status::render(&s, std::time::SystemTime::now()));
            if let Some(dir) = mtls_dir {
                println!("{}", botcreds_agent::tls::status_line(&dir));
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("botcreds-agent: {message}");
    ExitCode::FAILURE
}
