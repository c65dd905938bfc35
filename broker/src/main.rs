//! `botcreds`: run the broker (`serve`) or use the offline admin commands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use botcreds_broker::config::{Config, LogFormat, ProcessEnv};
use botcreds_broker::{cli, dev, server};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "botcreds",
    version,
    about = "Short-lived, policy-scoped credentials for bots"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve {
        /// Path to broker.toml.
        #[arg(long, required_unless_present = "dev", conflicts_with = "dev")]
        config: Option<PathBuf>,
        /// A development broker: loopback, temporary data, demo policy, simulated GitHub.
        #[arg(long)]
        dev: bool,
        /// Listen address for --dev.
        #[arg(long, default_value = "127.0.0.1:8443", requires = "dev")]
        listen: SocketAddr,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// API keys for bots that are not on the tailnet.
    ApiKey {
        #[command(subcommand)]
        command: ApiKeyCommand,
    },
    /// Shell completions: `botcreds completions bash > /etc/bash_completion.d/botcreds`.
    Completions { shell: clap_complete::Shell },
    /// Approvals, audit log, revocation, grants, bots (talks to the broker; see docs/approvals.md).
    #[command(flatten)]
    Admin(cli::admin::AdminCommand),
    /// mTLS enrollment: one-time join tokens for bot hosts.
    Enroll {
        #[command(subcommand)]
        command: cli::certs::EnrollCommand,
    },
    /// mTLS client certificates: list and revoke.
    Certs {
        #[command(subcommand)]
        command: cli::certs::CertsCommand,
    },
    /// LiteLLM virtual keys: list, create, revoke, rotate (docs/litellm.md).
    Keys {
        #[command(subcommand)]
        command: cli::keys::KeysCommand,
    },
    /// Offline checks of a stopped broker's store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Open the store of a stopped broker and check the audit chain and approval records;
    /// exits 1 when anything is broken.
    Verify {
        /// The broker's `data_dir`.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file; errors name file, line and column.
    Check { file: PathBuf },
    /// Say what the policy decides for a request, and which rule decides it.
    Explain {
        #[arg(long)]
        policy: PathBuf,
        /// The bot asking (omit for a caller that matches no bot).
        #[arg(long)]
        bot: Option<String>,
        /// Repository, owner/name (repeat or comma-separate).
        #[arg(long = "repo", value_delimiter = ',')]
        repositories: Vec<String>,
        /// Permissions, name:level (comma-separated).
        #[arg(long, value_delimiter = ',')]
        permissions: Vec<String>,
        /// A LiteLLM key scope instead of a GitHub request.
        #[arg(long)]
        scope: Option<String>,
        /// The GitHub credential kind: github_token (default) or deploy_key.
        #[arg(long, conflicts_with = "scope")]
        kind: Option<String>,
    },
    /// The broker's live policy, with remembered rules marked (asks the broker).
    Show(cli::admin::PolicyShowArgs),
    /// Remove a remembered rule ("approve + remember") by its id (asks the broker).
    Forget(cli::admin::PolicyForgetArgs),
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    /// Generate a key for a bot and print the broker.toml entry (only its hash is stored).
    New {
        #[arg(long)]
        bot: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Serve {
            config,
            dev,
            listen,
        } => match serve(config, dev, listen) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("botcreds: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Policy {
            command: PolicyCommand::Check { file },
        } => match cli::policy::check(&file) {
            Ok(summary) => {
                println!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    policy,
                    bot,
                    repositories,
                    permissions,
                    scope,
                    kind,
                },
        } => {
            let q = cli::policy::Question {
                bot: bot.as_deref(),
                repositories: &repositories,
                permissions: &permissions,
                scope: scope.as_deref(),
                kind: kind.as_deref(),
            };
            match cli::policy::explain(&policy, &q) {
                Ok((_, text)) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("botcreds: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::ApiKey {
            command: ApiKeyCommand::New { bot },
        } => {
            print!("{}", cli::new_api_key(&bot));
            ExitCode::SUCCESS
        }
        Command::Policy {
            command: PolicyCommand::Show(a),
        } => cli::admin::run_policy_show(a),
        Command::Policy {
            command: PolicyCommand::Forget(a),
        } => cli::admin::run_policy_forget(a),
        Command::Completions { shell } => {
            cli::admin::completions(shell, &mut <Args as clap::CommandFactory>::command())
        }
        Command::Admin(command) => cli::admin::run(command),
        Command::Enroll { command } => cli_exit(cli::certs::run_enroll(command)),
        Command::Certs { command } => cli_exit(cli::certs::run_certs(command)),
        Command::Keys { command } => cli_exit(cli::keys::run(command)),
        Command::Store {
            command: StoreCommand::Verify { data_dir },
        } => match cli::store::verify(&data_dir) {
            Ok(report) => {
                println!("{report}");
                if report.is_intact() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("botcreds: opening the store in {}: {e}", data_dir.display());
                ExitCode::FAILURE
            }
        },
    }
}

/// The exit status of an admin command that talks to the broker.
fn cli_exit(result: Result<(), cli::client::CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("botcreds: {e}");
            e.exit_code()
        }
    }
}

fn init_tracing(format: LogFormat, level: Option<&str>) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| level.map(str::to_string))
        .unwrap_or_else(|| "info".to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn serve(config: Option<PathBuf>, dev: bool, listen: SocketAddr) -> anyhow::Result<()> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        if dev {
            init_tracing(LogFormat::Text, None);
            let setup = dev::setup(listen)?;
            let listeners = server::bind(&setup.config).await?;
            let addr = listeners[0].local_addr()?;
            eprintln!(
                "{}",
                dev::banner(addr, &setup.api_key, &setup.admin_key, setup.dir.path())
            );
            server::run(
                setup.config.clone(),
                dev::edges(),
                listeners,
                shutdown_signal(),
            )
            .await?;
            drop(setup);
            return Ok(());
        }
        let path = config.context("--config is required")?;
        let config = Config::load(&path, &ProcessEnv)?;
        init_tracing(config.log_format, config.log_level.as_deref());
        let edges = server::Edges::from_config(&config)?;
        let listeners = server::bind(&config).await?;
        server::run(config, edges, listeners, shutdown_signal()).await?;
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
