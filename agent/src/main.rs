//! `botcreds-agent`: `run` the agent, or ask a running one for its `status`.

use std::path::PathBuf;
use std::process::ExitCode;

use botcreds_agent::broker_client::{API_KEY_ENV, Auth};
use botcreds_agent::config::Config;
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
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    let auth = match Auth::load(&config.auth, std::env::var(API_KEY_ENV).ok()) {
        Ok(a) => a,
        Err(e) => return fail(&e.to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(botcreds_agent::run(config, auth, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn show_status(config: Option<PathBuf>, socket: Option<PathBuf>, json: bool) -> ExitCode {
    let socket = match (config, socket) {
        (_, Some(socket)) => socket,
        (Some(path), None) => match Config::load(&path) {
            Ok(c) => c.socket,
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
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("botcreds-agent: {message}");
    ExitCode::FAILURE
}
