//! `botcreds enroll create` and `botcreds certs list|revoke`: mTLS join tokens and client
//! certificates, through the broker's admin routes (so they work while it runs); `certs
//! new-ca` creates a CA offline for rotation.

use botcreds_proto::enroll::{
    CertList, JoinToken, JoinTokenRequest, RevokeCertRequest, RevokedCerts,
};
use clap::Subcommand;

use super::client::{BrokerClient, CliError, Table, exit, print_json};

#[derive(Debug, Subcommand)]
pub enum EnrollCommand {
    /// Print a one-time join token for a bot's host (`botcreds-agent enroll --token ...`).
    Create {
        /// The bot the certificate will name.
        #[arg(long)]
        bot: String,
        /// How long the token may be used.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Certificates enrolled with this token carry the admin role.
        #[arg(long)]
        admin: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// The broker's URL (default: BOTCREDS_BROKER).
        #[arg(long)]
        broker: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Every client certificate the broker issued.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        broker: Option<String>,
    },
    /// Revoke a certificate by serial, or every certificate of a bot (`--bot NAME`).
    Revoke {
        /// Serial number in hex, as `certs list` shows it.
        #[arg(required_unless_present = "bot", conflicts_with = "bot")]
        serial: Option<String>,
        #[arg(long)]
        bot: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        broker: Option<String>,
    },
    /// Create a new CA offline (for rotation, docs/mtls.md): `ca.crt` and `ca.key` (0600).
    NewCa {
        /// Directory to create them in; existing files are not replaced.
        #[arg(long)]
        dir: std::path::PathBuf,
    },
}

/// Environment variable naming a PEM file with the admin's client certificate (and its key,
/// as the agent's `client.pem` holds both) for the broker's mTLS listener.
pub const CLIENT_CERT_ENV: &str = "BOTCREDS_CLIENT_CERT";
/// The private key's PEM file, when it is not in the certificate file.
pub const CLIENT_KEY_ENV: &str = "BOTCREDS_CLIENT_KEY";
/// The CA bundle that the broker's server certificate is verified against (`ca.pem`).
pub const CA_ENV: &str = "BOTCREDS_CA";

/// Add the client certificate and CA named by the environment to an admin HTTP client.
pub fn client_certificate_from_env(
    builder: reqwest::ClientBuilder,
) -> Result<reqwest::ClientBuilder, CliError> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let read = |name: &str, path: &str| {
        std::fs::read(path)
            .map_err(|e| CliError::new(exit::FAILURE, format!("{name}: cannot read {path}: {e}")))
    };
    let mut builder = builder;
    if let Some(ca) = var(CA_ENV) {
        let certs = reqwest::Certificate::from_pem_bundle(&read(CA_ENV, &ca)?)
            .map_err(|e| CliError::new(exit::FAILURE, format!("{CA_ENV}: {ca}: {e}")))?;
        builder = builder.tls_certs_only(certs);
    }
    if let Some(cert) = var(CLIENT_CERT_ENV) {
        let mut pem = match var(CLIENT_KEY_ENV) {
            Some(key) => read(CLIENT_KEY_ENV, &key)?,
            None => Vec::new(),
        };
        pem.extend_from_slice(&read(CLIENT_CERT_ENV, &cert)?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            CliError::new(
                exit::FAILURE,
                format!("{CLIENT_CERT_ENV}: {cert} is not a certificate and key: {e}"),
            )
        })?;
        builder = builder.identity(identity);
    }
    Ok(builder)
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::new(exit::FAILURE, format!("starting the async runtime: {e}")))
}

/// Run `botcreds enroll ...`.
pub fn run_enroll(command: EnrollCommand) -> Result<(), CliError> {
    let EnrollCommand::Create {
        bot,
        ttl,
        admin,
        json,
        broker,
    } = command;
    let client = BrokerClient::from_args(broker)?;
    let token: JoinToken = runtime()?.block_on(client.post(
        "/v1/enroll/tokens",
        &JoinTokenRequest {
            bot,
            ttl: Some(ttl),
            admin,
        },
    ))?;
    if json {
        return print_json(&token);
    }
    println!(
        "Join token for {}{} (single use, expires {}; shown only now):\n  {}\n\n\
         On the bot's host:\n  botcreds-agent enroll --broker {} --token {}",
        token.bot,
        if token.admin { " (admin)" } else { "" },
        token.expires_at,
        token.token,
        client.base(),
        token.token
    );
    Ok(())
}

/// Run `botcreds certs ...`.
pub fn run_certs(command: CertsCommand) -> Result<(), CliError> {
    match command {
        CertsCommand::List { json, broker } => {
            let client = BrokerClient::from_args(broker)?;
            let list: CertList = runtime()?.block_on(client.get("/v1/certs"))?;
            if json {
                return print_json(&list);
            }
            print!("{}", certs_table(&list));
            Ok(())
        }
        CertsCommand::Revoke {
            serial,
            bot,
            json,
            broker,
        } => {
            let client = BrokerClient::from_args(broker)?;
            let answer: RevokedCerts = runtime()?
                .block_on(client.post("/v1/certs/revoke", &RevokeCertRequest { serial, bot }))?;
            if json {
                return print_json(&answer);
            }
            if answer.revoked.is_empty() {
                println!("nothing to revoke: already revoked");
            }
            for s in &answer.revoked {
                println!("revoked {s}");
            }
            Ok(())
        }
        CertsCommand::NewCa { dir } => {
            let (cert, key) = (dir.join("ca.crt"), dir.join("ca.key"));
            crate::tls::ca::create_ca_files(&cert, &key, ::time::OffsetDateTime::now_utc())
                .map_err(|e| CliError::new(exit::FAILURE, e.to_string()))?;
            println!(
                "created {} and {} (0600)\nRotation steps: docs/mtls.md, \"Rotating the CA\"",
                cert.display(),
                key.display()
            );
            Ok(())
        }
    }
}

/// `certs list` as a table; the state column says revoked, or nothing.
pub fn certs_table(list: &CertList) -> String {
    let mut t = Table::new([
        "SERIAL", "BOT", "ROLE", "VIA", "ISSUED", "EXPIRES", "REVOKED",
    ]);
    for c in &list.certificates {
        t.row([
            c.serial.clone(),
            c.bot.clone(),
            if c.admin { "admin" } else { "bot" }.to_string(),
            c.issued_via.clone(),
            c.issued_at.clone(),
            c.expires_at.clone(),
            c.revoked_at.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use botcreds_proto::enroll::CertSummary;

    #[test]
    fn table_shows_role_and_revocation() {
        let list = CertList {
            certificates: vec![CertSummary {
                serial: "40ab".into(),
                bot: "ci".into(),
                admin: true,
                issued_at: "2026-01-01T00:00:00Z".into(),
                expires_at: "2026-01-02T00:00:00Z".into(),
                issued_via: "token".into(),
                revoked_at: Some("2026-01-01T01:00:00Z".into()),
            }],
        };
        let text = certs_table(&list);
        assert!(text.starts_with("SERIAL"), "{text}");
        assert!(text.contains("40ab    ci   admin  token"), "{text}");
        assert!(text.contains("2026-01-01T01:00:00Z"), "{text}");
    }
}
