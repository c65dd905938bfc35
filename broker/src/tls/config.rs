//! `[tls]` in broker.toml: the mTLS listener, the broker's CA and certificate lifetimes.
//! Parsed strictly here so that `config.rs` only names the table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use botcreds_proto::Ttl;
use serde::Deserialize;

use crate::settings::Invalid;

/// The table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTlsConfig {
    listen: Vec<String>,
    #[serde(default)]
    server_names: Vec<String>,
    ca_cert_file: Option<PathBuf>,
    ca_key_file: Option<PathBuf>,
    #[serde(default)]
    extra_trusted_ca_files: Vec<PathBuf>,
    #[serde(default = "default_cert_ttl")]
    client_cert_ttl: Ttl,
    #[serde(default = "default_max_join_ttl")]
    max_join_token_ttl: Ttl,
    #[serde(default = "default_handshake_timeout")]
    handshake_timeout: Ttl,
    #[serde(default)]
    tailnet_enrollment: bool,
    /// `"ca"` (default) or `"tailscale"`.
    server_certificate: Option<String>,
}

fn default_cert_ttl() -> Ttl {
    Ttl::from_secs(24 * 3600)
}
fn default_max_join_ttl() -> Ttl {
    Ttl::from_secs(7 * 24 * 3600)
}
fn default_handshake_timeout() -> Ttl {
    Ttl::from_secs(10)
}

/// Where the CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// `ca.crt` and `ca.key` under `<data_dir>/tls/`, created on first start.
    DataDir,
    /// Files named in the config (an offline or shared CA).
    Files { cert: PathBuf, key: PathBuf },
}

/// Where the mTLS listener's server certificate comes from (`[tls] server_certificate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCertificate {
    /// Issued by the broker's own CA for `server_names` on every start.
    Ca,
    /// The node's own certificate pair for its MagicDNS name, from tailscaled's LocalAPI on
    /// this socket, refreshed while the broker runs.
    Tailscale { socket: PathBuf },
}

/// The validated `[tls]` table.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub listen: Vec<SocketAddr>,
    /// DNS names and IP addresses the server certificate names.
    pub server_names: Vec<String>,
    pub ca: CaSource,
    /// Older (or other) CA certificates whose client certificates are still accepted:
    /// the rotation window.
    pub extra_trusted_ca_files: Vec<PathBuf>,
    pub client_cert_ttl: Duration,
    pub max_join_token_ttl: Duration,
    pub handshake_timeout: Duration,
    /// Whether a tailnet caller mapped to a bot by the policy may enroll without a token.
    pub tailnet_enrollment: bool,
    pub server_certificate: ServerCertificate,
}

impl RawTlsConfig {
    /// Validate; error keys are under `tls.`. `tailscaled_socket` is
    /// the LocalAPI socket of `[tailscale]`, `None` when it is disabled.
    pub fn validate(
        self,
        resolve: &dyn Fn(&Path) -> PathBuf,
        tailscaled_socket: Option<&Path>,
    ) -> Result<TlsConfig, Invalid> {
        let bad = |key: &str, message: String| Err(Invalid::new(format!("tls.{key}"), message));
        let server_certificate = match (self.server_certificate.as_deref(), tailscaled_socket) {
            (None | Some("ca"), _) => ServerCertificate::Ca,
            (Some("tailscale"), Some(socket)) => ServerCertificate::Tailscale {
                socket: socket.to_path_buf(),
            },
            (Some("tailscale"), None) => {
                return bad(
                    "server_certificate",
                    "\"tailscale\" asks tailscaled for the certificate: enable [tailscale]".into(),
                );
            }
            (Some(other), _) => {
                return bad(
                    "server_certificate",
                    format!("{other:?} must be \"ca\" or \"tailscale\""),
                );
            }
        };
        if self.listen.is_empty() {
            return bad("listen", "at least one address is needed".into());
        }
        let mut listen = Vec::new();
        for (i, a) in self.listen.iter().enumerate() {
            match a.parse::<SocketAddr>() {
                Ok(addr) => listen.push(addr),
                Err(_) => {
                    return bad(
                        &format!("listen[{i}]"),
                        format!("{a:?} is not an IP:port address (e.g. 0.0.0.0:8444)"),
                    );
                }
            }
        }
        let mut server_names = self.server_names;
        for (i, n) in server_names.iter().enumerate() {
            let ok = n.parse::<std::net::IpAddr>().is_ok()
                || (!n.is_empty()
                    && n.len() <= 253
                    && n.split('.').all(|l| {
                        !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    }));
            if !ok {
                return bad(
                    &format!("server_names[{i}]"),
                    format!("{n:?} is neither a DNS name nor an IP address"),
                );
            }
        }
        if server_names.is_empty() {
            server_names.push("localhost".into());
            for a in &listen {
                if !a.ip().is_unspecified() {
                    server_names.push(a.ip().to_string());
                }
            }
            server_names.dedup();
        }
        let ca = match (self.ca_cert_file, self.ca_key_file) {
            (None, None) => CaSource::DataDir,
            (Some(cert), Some(key)) => CaSource::Files {
                cert: resolve(&cert),
                key: resolve(&key),
            },
            (Some(_), None) => return bad("ca_key_file", "required with ca_cert_file".into()),
            (None, Some(_)) => return bad("ca_cert_file", "required with ca_key_file".into()),
        };
        let client_cert_ttl = self.client_cert_ttl.as_duration();
        if client_cert_ttl < Duration::from_secs(60) {
            return bad(
                "client_cert_ttl",
                "must be at least 1m, so renewal has time to happen".into(),
            );
        }
        if client_cert_ttl > Duration::from_secs(90 * 86_400) {
            return bad(
                "client_cert_ttl",
                "must be at most 90d; certificates are meant to be short-lived".into(),
            );
        }
        Ok(TlsConfig {
            listen,
            server_names,
            ca,
            extra_trusted_ca_files: self
                .extra_trusted_ca_files
                .iter()
                .map(|p| resolve(p))
                .collect(),
            client_cert_ttl,
            max_join_token_ttl: self.max_join_token_ttl.as_duration(),
            handshake_timeout: self.handshake_timeout.as_duration(),
            tailnet_enrollment: self.tailnet_enrollment,
            server_certificate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TlsConfig, (String, String)> {
        let raw: RawTlsConfig = toml::from_str(text).map_err(|e| ("toml".into(), e.to_string()))?;
        raw.validate(
            &|p: &Path| Path::new("/etc/botcreds").join(p),
            Some(Path::new("/run/ts.sock")),
        )
        .map_err(|e| (e.key, e.message))
    }

    #[test]
    fn defaults_and_errors_name_the_key() {
        let c = parse("listen = [\"127.0.0.1:8444\"]\n").unwrap();
        assert_eq!(c.client_cert_ttl, Duration::from_secs(86_400));
        assert_eq!(c.ca, CaSource::DataDir);
        assert_eq!(c.server_names, vec!["localhost", "127.0.0.1"]);
        let c =
            parse("listen = [\"127.0.0.1:1\"]\nca_cert_file = \"ca.pem\"\nca_key_file = \"k\"\n")
                .unwrap();
        assert_eq!(
            c.ca,
            CaSource::Files {
                cert: "/etc/botcreds/ca.pem".into(),
                key: "/etc/botcreds/k".into()
            }
        );
        for (text, key) in [
            ("listen = []\n", "tls.listen"),
            ("listen = [\"x\"]\n", "tls.listen[0]"),
            (
                "listen = [\"127.0.0.1:1\"]\nca_cert_file = \"c\"\n",
                "tls.ca_key_file",
            ),
            (
                "listen = [\"127.0.0.1:1\"]\nclient_cert_ttl = \"30s\"\n",
                "tls.client_cert_ttl",
            ),
            (
                "listen = [\"127.0.0.1:1\"]\nserver_names = [\"a b\"]\n",
                "tls.server_names[0]",
            ),
            ("listen = [\"127.0.0.1:1\"]\ncolour = 1\n", "toml"),
            (
                "listen = [\"127.0.0.1:1\"]\nserver_certificate = \"acme\"\n",
                "tls.server_certificate",
            ),
        ] {
            assert_eq!(parse(text).unwrap_err().0, key, "{text}");
        }
    }

    #[test]
    fn server_certificate_source() {
        let c = parse("listen = [\"127.0.0.1:1\"]\n").unwrap();
        assert_eq!(c.server_certificate, ServerCertificate::Ca);
        let c = parse("listen = [\"127.0.0.1:1\"]\nserver_certificate = \"ca\"\n").unwrap();
        assert_eq!(c.server_certificate, ServerCertificate::Ca);
        let c = parse("listen = [\"127.0.0.1:1\"]\nserver_certificate = \"tailscale\"\n").unwrap();
        assert_eq!(
            c.server_certificate,
            ServerCertificate::Tailscale {
                socket: "/run/ts.sock".into()
            }
        );
        // Without [tailscale] there is nobody to ask.
        let raw: RawTlsConfig =
            toml::from_str("listen = [\"127.0.0.1:1\"]\nserver_certificate = \"tailscale\"\n")
                .unwrap();
        let Invalid { key, message } = raw.validate(&|p: &Path| p.to_path_buf(), None).unwrap_err();
        assert_eq!(key, "tls.server_certificate");
        assert!(message.contains("[tailscale]"), "{message}");
    }
}
