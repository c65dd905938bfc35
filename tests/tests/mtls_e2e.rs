//! End-to-end mTLS: the real broker with `[tls]`, the real admin CLI creating join tokens and
//! revoking certificates, and the real agent enrolling (key made on the host); then requests
//! over mTLS, the attacks the listener must refuse, and revocation across a restart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use botcreds_broker::store::{AuditFilter, SledStore, Store};
use botcreds_proto::audit::AuditEventKind;
use botcreds_proto::enroll::{CertList, JoinToken};
use botcreds_tests::broker::{BrokerBuilder, BrokerProcess, binary};
use botcreds_tests::fake_github::{FakeGithub, FakeGithubConfig};
use botcreds_tests::world::World;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const POLICY: &str = r#"
bots:
  cert-bot:
    identity: { type: mtls }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
  ops:
    identity: { type: api_key }
defaults:
  requires_approval: true
"#;

const OPS_KEY: &str = "bck_e2eOpsAdminKey0123456789abcdefgh";
const TLS_TOML: &str = "[admin]\napi_key_bots = [\"ops\"]\n\n[tls]\nlisten = [\"127.0.0.1:0\"]\n\
    server_names = [\"localhost\", \"127.0.0.1\"]\nclient_cert_ttl = \"1h\"\n\
    handshake_timeout = \"5s\"\n";
const WAIT: Duration = Duration::from_secs(60);

/// The world (no tailnet identity: the bot is known by its client certificate) and the
/// broker's mTLS listener.
struct MtlsWorld {
    world: World,
    tls: SocketAddr,
}

impl std::ops::Deref for MtlsWorld {
    type Target = World;
    fn deref(&self) -> &World {
        &self.world
    }
}

impl std::ops::DerefMut for MtlsWorld {
    fn deref_mut(&mut self) -> &mut World {
        &mut self.world
    }
}

async fn world() -> MtlsWorld {
    let mut world = World::builder(POLICY)
        .no_tailscaled()
        .api_key("ops", OPS_KEY)
        .toml(TLS_TOML)
        .start()
        .await;
    let tls = tls_addr(&mut world.broker).await;
    MtlsWorld { world, tls }
}

/// The mTLS listener's address, from the broker's readiness line.
async fn tls_addr(broker: &mut BrokerProcess) -> SocketAddr {
    assert!(
        broker.wait_for_log("botcreds mTLS listening", WAIT).await,
        "no mTLS listener:\n{}",
        broker.logs()
    );
    broker
        .logs()
        .lines()
        .filter(|l| l.contains("botcreds mTLS listening"))
        .find_map(|l| {
            let start = l.find("addr=")? + 5;
            l[start..].split_whitespace().next()?.parse().ok()
        })
        .expect("mTLS listen address in the log")
}

/// `botcreds ARGS` as the ops admin; (exit code, stdout, stderr).
async fn cli(broker_url: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(binary("botcreds"))
        .args(args)
        .env("BOTCREDS_BROKER", broker_url)
        .env("BOTCREDS_API_KEY", OPS_KEY)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running botcreds");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `botcreds ARGS` over the mTLS listener with the certificate in `state_dir`, no API key.
async fn cli_with_cert(tls_url: &str, state_dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(binary("botcreds"))
        .args(args)
        .env("BOTCREDS_BROKER", tls_url)
        .env_remove("BOTCREDS_API_KEY")
        .env("BOTCREDS_CLIENT_CERT", state_dir.join("client.pem"))
        .env("BOTCREDS_CA", state_dir.join("ca.pem"))
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running botcreds");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn join_token(broker_url: &str, bot: &str) -> String {
    let (code, out, err) = cli(broker_url, &["enroll", "create", "--bot", bot, "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let token: JoinToken = serde_json::from_str(&out).expect("join token JSON");
    assert_eq!(token.bot, bot);
    token.token
}

/// `botcreds-agent enroll` into `state_dir`; (exit code, stdout, stderr).
async fn agent_enroll(broker_url: &str, token: &str, state_dir: &Path) -> (i32, String, String) {
    let out = tokio::process::Command::new(binary("botcreds-agent"))
        .arg("enroll")
        .arg("--broker")
        .arg(broker_url)
        .arg("--state-dir")
        .arg(state_dir)
        .env("BOTCREDS_JOIN_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("running botcreds-agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn home_status(
    home: &botcreds_tests::agent::AgentHome,
) -> (botcreds_proto::agent::AgentStatus, String) {
    let out = tokio::process::Command::new(binary("botcreds-agent"))
        .arg("status")
        .arg("--config")
        .arg(home.config_path())
        .arg("--json")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    (serde_json::from_str(&text).expect("status JSON"), text)
}

/// The serial `botcreds-agent enroll` reports (`certificate SERIAL,`).
fn serial_in(enroll_output: &str) -> String {
    let start = enroll_output
        .find("certificate ")
        .expect("serial in the output")
        + 12;
    enroll_output[start..]
        .split(|c: char| !c.is_ascii_hexdigit())
        .next()
        .unwrap()
        .to_string()
}

/// A client presenting the enrolled certificate and trusting only the broker's CA bundle.
fn mtls_client(state_dir: &Path) -> reqwest::Client {
    let identity = std::fs::read(state_dir.join("client.pem")).unwrap();
    let ca = std::fs::read(state_dir.join("ca.pem")).unwrap();
    reqwest::Client::builder()
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&ca).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn get_json(client: &reqwest::Client, url: &str) -> Result<(u16, Value), String> {
    let resp = client.get(url).send().await.map_err(|e| error_chain(&e))?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.map_err(|e| e.to_string())?))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}

fn audit_events(data_dir: &Path) -> Vec<botcreds_proto::AuditEvent> {
    let store = SledStore::open(data_dir).expect("open the stopped broker's store");
    assert_eq!(store.verify_audit_chain().unwrap().first_broken, None);
    store.read_audit(&AuditFilter::default()).unwrap()
}

/// Start the broker again on the same config and data dir.
async fn restart(old: &mut BrokerProcess) -> BrokerProcess {
    assert!(old.stop().await.success());
    let dir = tempfile::tempdir().unwrap();
    // The old process's files stay where they are; the new process reads the same config.
    let mut cmd = tokio::process::Command::new(binary("botcreds"));
    cmd.arg("serve")
        .arg("--config")
        .arg(&old.config_path)
        .env("RUST_LOG", "info")
        .env("BOTCREDS_TEST_KEY_0", OPS_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match BrokerProcess::try_spawn(
        &mut cmd,
        dir,
        old.config_path.clone(),
        old.policy_path.clone(),
    )
    .await
    {
        Ok(b) => b,
        Err(f) => panic!("broker did not restart: {}", f.logs),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn enrolled_agent_gets_credentials_over_mtls_until_revoked_across_restarts() {
    let mut w = world().await;
    let url = w.broker.url.clone();
    let home = tempfile::tempdir().unwrap();
    let (kept_dir, revoked_dir) = (home.path().join("kept"), home.path().join("revoked"));

    let token = join_token(&url, "cert-bot").await;
    let (code, out, err) = agent_enroll(&url, &token, &kept_dir).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("bot cert-bot"), "{out}");
    let mode = std::fs::metadata(kept_dir.join("client.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the key file is private");

    // The same token again: refused, nothing stored.
    let (code, _, err) = agent_enroll(&url, &token, &home.path().join("again")).await;
    assert_ne!(code, 0);
    assert!(err.contains("invalid_join_token"), "{err}");
    assert!(!home.path().join("again/client.pem").exists());

    let token = join_token(&url, "cert-bot").await;
    let (code, revoked_out, err) = agent_enroll(&url, &token, &revoked_dir).await;
    assert_eq!(code, 0, "{err}");

    // Over mTLS the certificate is the identity, mapped onto the policy's mtls bot.
    let base = format!("https://localhost:{}", w.tls.port());
    let kept = mtls_client(&kept_dir);
    let revoked = mtls_client(&revoked_dir);
    let (status, who) = get_json(&revoked, &format!("{base}/v1/whoami"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{who}");
    assert_eq!(
        (who["via"].as_str(), who["bot"].as_str()),
        (Some("mtls"), Some("cert-bot"))
    );
    let resp = kept
        .post(format!("{base}/v1/credentials"))
        .json(
            &json!({"kind": "github_token", "repositories": ["acme-corp/web"],
                      "permissions": ["contents:read"], "reason": "mtls e2e"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);

    // Revoke one certificate by serial: its next request, on the same keep-alive connection,
    // is refused.
    let (code, out, err) = cli(&url, &["certs", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let list: CertList = serde_json::from_str(&out).unwrap();
    assert_eq!(list.certificates.len(), 2);
    let revoked_serial = serial_in(&revoked_out);
    assert!(list.certificates.iter().any(|c| c.serial == revoked_serial));
    let (code, out, err) = cli(&url, &["certs", "revoke", &revoked_serial]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&revoked_serial), "{out}");
    let (status, body) = get_json(&revoked, &format!("{base}/v1/whoami"))
        .await
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(body["code"], "certificate_revoked");
    let (code, out, _) = cli(&url, &["certs", "list"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("SERIAL"), "{out}");

    // An admin certificate (from an --admin token) works the admin CLI over mTLS; a bot's
    // certificate does not.
    let (code, out, err) = cli(
        &url,
        &["enroll", "create", "--bot", "ops", "--admin", "--json"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let admin_token: JoinToken = serde_json::from_str(&out).unwrap();
    assert!(admin_token.admin);
    let admin_dir = home.path().join("admin");
    let (code, _, err) = agent_enroll(&url, &admin_token.token, &admin_dir).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli_with_cert(&base, &admin_dir, &["certs", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let list: CertList = serde_json::from_str(&out).unwrap();
    assert!(list.certificates.iter().any(|c| c.bot == "ops" && c.admin));
    let (code, _, err) = cli_with_cert(&base, &kept_dir, &["certs", "list"]).await;
    assert_eq!(code, 5, "a bot certificate is not an admin: {err}");

    // After a restart the CA and the records are the same: the kept certificate still works,
    // the revoked one is still refused.
    // The first process keeps the temp dir (config and data) alive; it is stopped.
    let mut again = restart(&mut w.broker).await;
    let tls = tls_addr(&mut again).await;
    let base = format!("https://localhost:{}", tls.port());
    let (status, _) = get_json(&mtls_client(&kept_dir), &format!("{base}/v1/whoami"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let (status, body) = get_json(&mtls_client(&revoked_dir), &format!("{base}/v1/whoami"))
        .await
        .unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("certificate_revoked"))
    );

    assert!(again.stop().await.success());
    let kinds: Vec<AuditEventKind> = audit_events(&w.broker.data_dir())
        .iter()
        .map(|e| e.event)
        .collect();
    for kind in [
        AuditEventKind::EnrollTokenCreated,
        AuditEventKind::CertIssued,
        AuditEventKind::CertRevoked,
        AuditEventKind::CertRefused,
        AuditEventKind::CredentialIssued,
    ] {
        assert!(kinds.contains(&kind), "no {kind:?} in {kinds:?}");
    }
}

/// A certificate signed by the broker's own CA (read from its data dir), valid from
/// `start_offset` seconds for one hour.
fn cert_from_broker_ca(data_dir: &Path, start_offset: i64) -> (String, String) {
    let ca_cert = std::fs::read_to_string(data_dir.join("tls/ca.crt")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(data_dir.join("tls/ca.key")).unwrap())
            .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert, ca_key).unwrap();
    signed_client_cert(&issuer, start_offset)
}

fn signed_client_cert(
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    start_offset: i64,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        "botcreds://bot/cert-bot".try_into().unwrap(),
    )];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let start = time::OffsetDateTime::now_utc() + time::Duration::seconds(start_offset);
    p.not_before = start;
    p.not_after = start + time::Duration::hours(1);
    (
        p.signed_by(&key, issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

fn client_with(ca_pem: &str, identity: Option<(&str, &str)>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(30));
    if let Some((cert, key)) = identity {
        b = b.identity(reqwest::Identity::from_pem(format!("{key}{cert}").as_bytes()).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tls_listener_refuses_attacks_and_keeps_serving() {
    let mut w = world().await;
    let data_dir: PathBuf = w.broker.data_dir();
    let ca_pem = std::fs::read_to_string(data_dir.join("tls/ca.crt")).unwrap();
    let whoami = format!("https://localhost:{}/v1/whoami", w.tls.port());
    let refusals_before = w.broker.log_count("mTLS handshake refused");

    // Plain HTTP to the TLS port: no HTTP answer, the connection is closed.
    let mut s = TcpStream::connect(w.tls).await.unwrap();
    s.write_all(b"GET /v1/whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    assert!(!buf.starts_with(b"HTTP/"), "plain HTTP was answered");

    // A truncated handshake: the start of a ClientHello, then the client goes away.
    let mut s = TcpStream::connect(w.tls).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    drop(s);

    // A TLS client without a certificate.
    let err = get_json(&client_with(&ca_pem, None), &whoami)
        .await
        .unwrap_err();
    assert!(!err.is_empty());

    // Expired, and not yet valid, though signed by the broker's own CA.
    for offset in [-3 * 3600, 2 * 3600] {
        let (cert, key) = cert_from_broker_ca(&data_dir, offset);
        let result = get_json(&client_with(&ca_pem, Some((&cert, &key))), &whoami).await;
        assert!(result.is_err(), "offset {offset}: {result:?}");
    }

    // A certificate naming the bot, from another CA.
    let other_key = rcgen::KeyPair::generate().unwrap();
    let mut other = rcgen::CertificateParams::default();
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_issuer = rcgen::Issuer::new(other, other_key);
    let (cert, key) = signed_client_cert(&other_issuer, -60);
    let result = get_json(&client_with(&ca_pem, Some((&cert, &key))), &whoami).await;
    assert!(result.is_err(), "{result:?}");

    // A valid certificate from the broker's CA but never issued (no record): refused at the
    // request, not by the handshake.
    let (cert, key) = cert_from_broker_ca(&data_dir, -60);
    let (status, body) = get_json(&client_with(&ca_pem, Some((&cert, &key))), &whoami)
        .await
        .unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("certificate_revoked"))
    );

    // Every handshake attack was logged as refused; the listener still serves an enrolled host.
    assert!(
        w.broker
            .wait_for_count("mTLS handshake refused", refusals_before + 6, WAIT)
            .await,
        "{}",
        w.broker.logs()
    );
    let home = tempfile::tempdir().unwrap();
    let token = join_token(&w.broker.url, "cert-bot").await;
    let (code, _, err) = agent_enroll(&w.broker.url, &token, home.path()).await;
    assert_eq!(code, 0, "{err}");
    let (status, _) = get_json(&mtls_client(home.path()), &whoami).await.unwrap();
    assert_eq!(status, 200);
    assert!(
        !w.broker.logs().contains(&token),
        "the join token is never logged"
    );

    assert!(w.broker.stop().await.success());
    let refused = audit_events(&data_dir)
        .into_iter()
        .filter(|e| e.event == AuditEventKind::CertRefused)
        .count();
    assert!(refused >= 7, "{refused} cert_refused events");
}

const AGENT_POLICY: &str = r#"
bots:
  cert-bot:
    identity: { type: mtls }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:write]
  ops:
    identity: { type: api_key }
defaults:
  requires_approval: true
"#;

/// The git credential helper's whole path over mTLS: git → helper → agent → broker (client
/// certificate) → fake GitHub; then the agent renews its one-minute certificate by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_clone_through_the_agent_over_mtls_and_automatic_renewal() {
    use std::sync::Arc;

    use botcreds_tests::agent::{AgentBuilder, GithubEntry, HttpPath};
    use botcreds_tests::git_server::GitServer;

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let mut broker = BrokerBuilder::new(AGENT_POLICY)
        .github(&github.base_url(), botcreds_tests::fixtures::APP_ID)
        .api_key("ops", OPS_KEY)
        // A fixed port, so that the agent finds the broker again after a restart.
        .toml(
            &TLS_TOML
                .replace("client_cert_ttl = \"1h\"", "client_cert_ttl = \"1m\"")
                .replace("127.0.0.1:0", &format!("127.0.0.1:{}", free_port())),
        )
        .start()
        .await;
    let tls = tls_addr(&mut broker).await;

    let issuer = github.clone();
    let git = GitServer::start(Arc::new(move |token: &str, repo: &str, write: bool| {
        let level = if write { "write" } else { "read" };
        issuer
            .token_info(token)
            .is_some_and(|info| info.allows(repo, "contents", level))
    }))
    .await
    .expect("git server");
    git.create_repo("acme-corp/web").expect("bare repository");

    let state = tempfile::tempdir().unwrap();
    let token = join_token(&broker.url, "cert-bot").await;
    let (code, enrolled, err) = agent_enroll(&broker.url, &token, state.path()).await;
    assert_eq!(code, 0, "{err}");
    let first_serial = serial_in(&enrolled);

    let home = AgentBuilder::new(&format!("https://127.0.0.1:{}", tls.port()))
        .toml(&format!(
            "auth = \"mtls\"\nstate_dir = {:?}",
            state.path().display().to_string()
        ))
        .github(GithubEntry::new(
            &git.host(),
            &["acme-corp/web"],
            &["contents:write"],
        ))
        .build();
    let mut agent = home.start().await;

    let url = git.url("acme-corp/web");
    let out = home
        .git(".", HttpPath::NotSent, &["clone", "--quiet", &url, "web"])
        .await;
    assert!(out.success, "{}\nagent:\n{}", out.stderr, agent.logs());
    assert!(home.work_dir().join("web/README.md").exists());

    // Two-thirds into the one-minute certificate the agent renews it with the current one.
    assert!(
        agent
            .wait_for_log("mTLS certificate renewed", Duration::from_secs(180))
            .await,
        "no renewal:\n{}",
        agent.logs()
    );
    let (code, out, err) = cli(&broker.url, &["certs", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let list: CertList = serde_json::from_str(&out).unwrap();
    let renewed = list
        .certificates
        .iter()
        .find(|c| c.issued_via == "renewal")
        .expect("a renewed certificate");
    assert_ne!(renewed.serial, first_serial);

    // The status shows the certificate now on disk: the renewed one.
    let status = tokio::process::Command::new(binary("botcreds-agent"))
        .arg("status")
        .arg("--config")
        .arg(home.config_path())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert!(
        text.contains("mTLS certificate: mtls (bot cert-bot"),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("mTLS certificate:"))
        .unwrap();
    assert!(!line.contains(&first_serial), "{text}");

    // Through a broker restart: same CA and records, so the agent's next renewal (over a new
    // connection, verifying the new server certificate) succeeds.
    let renewals = agent.log_count("mTLS certificate renewed");
    let mut again = restart(&mut broker).await;
    assert_eq!(tls_addr(&mut again).await, tls);
    assert!(
        agent
            .wait_for_count(
                "mTLS certificate renewed",
                renewals + 1,
                Duration::from_secs(180)
            )
            .await,
        "no renewal after the restart:\n{}",
        agent.logs()
    );
    let (status, _) = home_status(&home).await;
    assert!(status.broker_reachable, "{:?}", status.broker_probe_error);
    let _ = agent.stop().await;
    assert!(again.stop().await.success());
}

/// `[tls] tailnet_enrollment`: a tailnet host the policy maps to a bot enrolls without a token,
/// for that bot only; a host the policy does not know is refused.
#[tokio::test(flavor = "multi_thread")]
async fn tailnet_host_enrolls_without_a_token_for_its_own_bot_only() {
    use botcreds_tests::fake_tailscaled::{FakeTailscaled, NodeBuilder};

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let tailscaled = FakeTailscaled::start().await;
    tailscaled.add_node(
        "127.0.0.2".parse().unwrap(),
        NodeBuilder::new("ci-bot-07").tags(["tag:ci"]).build(),
    );
    tailscaled.add_node(
        "127.0.0.3".parse().unwrap(),
        NodeBuilder::new("stranger")
            .login("bob@example.com")
            .build(),
    );
    let policy = "bots:\n  ci-bot:\n    identity: { tag: \"tag:ci\" }\n  ops:\n    identity: { type: api_key }\n";
    let mut broker = BrokerBuilder::new(policy)
        .github(&github.base_url(), botcreds_tests::fixtures::APP_ID)
        .tailscaled(tailscaled.socket_path())
        .api_key("ops", OPS_KEY)
        .toml(&format!("{TLS_TOML}tailnet_enrollment = true\n"))
        .start()
        .await;
    let tls = tls_addr(&mut broker).await;

    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let enroll = |from: &str, bot: Option<&str>| {
        let client = broker.client_from(from.parse().unwrap());
        let body = json!({"bot": bot, "csr": csr});
        let url = format!("{}/v1/enroll", broker.url);
        async move {
            let resp = client.post(url).json(&body).send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap())
        }
    };

    let (status, body) = enroll("127.0.0.2", Some("ops")).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let (status, body) = enroll("127.0.0.3", None).await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = enroll("127.0.0.4", None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("invalid_join_token")),
        "{body}"
    );

    let (status, cert) = enroll("127.0.0.2", None).await;
    assert_eq!(status, 200, "{cert}");
    assert_eq!(cert["bot"], "ci-bot");
    // The certificate is ci-bot's, over mTLS and off the tailnet.
    let pem = cert["certificate"].as_str().unwrap();
    let client = client_with(
        cert["ca_bundle"].as_str().unwrap(),
        Some((pem, &key.serialize_pem())),
    );
    let (status, who) = get_json(
        &client,
        &format!("https://localhost:{}/v1/whoami", tls.port()),
    )
    .await
    .unwrap();
    assert_eq!(
        (status, who["bot"].as_str()),
        (200, Some("ci-bot")),
        "{who}"
    );
}

/// Rewrites the broker's config: `lines` go right under its `[tls]` header.
fn set_tls_keys(config_path: &Path, base: &str, lines: &str) {
    let config = base.replacen("[tls]\n", &format!("[tls]\n{lines}"), 1);
    std::fs::write(config_path, config).unwrap();
}

/// `client` asks who it is on the mTLS listener: the bot's name, or the error.
async fn whoami(client: &reqwest::Client, tls: SocketAddr) -> Result<String, String> {
    let (status, who) = get_json(
        client,
        &format!("https://localhost:{}/v1/whoami", tls.port()),
    )
    .await?;
    if status != 200 {
        return Err(format!("HTTP {status}: {who}"));
    }
    Ok(who["bot"].as_str().unwrap_or_default().to_string())
}

/// A client presenting the certificate in `state_dir` and trusting the CAs in `ca_files`.
fn client_trusting(state_dir: &Path, ca_files: &[&Path]) -> reqwest::Client {
    let identity = std::fs::read(state_dir.join("client.pem")).unwrap();
    let mut bundle = Vec::new();
    for f in ca_files {
        bundle.extend(std::fs::read(f).unwrap());
    }
    reqwest::Client::builder()
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&bundle).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn ca_rotation_keeps_old_certificates_working_until_the_old_ca_is_retired() {
    let mut w = world().await;
    let home = tempfile::tempdir().unwrap();
    let (old_agent, new_agent) = (home.path().join("old"), home.path().join("new"));
    let old_ca = w.broker.data_dir().join("tls/ca.crt");
    let base_config = std::fs::read_to_string(&w.broker.config_path).unwrap();
    let mut stopped = Vec::new();

    let token = join_token(&w.broker.url, "cert-bot").await;
    let (code, out, err) = agent_enroll(&w.broker.url, &token, &old_agent).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        whoami(&mtls_client(&old_agent), w.tls).await,
        Ok("cert-bot".into())
    );

    // The new CA, made offline.
    let new_ca_dir = home.path().join("ca-2027");
    let (code, out, err) = cli(
        &w.broker.url,
        &["certs", "new-ca", "--dir", new_ca_dir.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let new_ca = new_ca_dir.join("ca.crt");
    let key_mode = std::fs::metadata(new_ca_dir.join("ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600, "the new CA key is private");

    // 1. Pre-distribute: the new CA is trusted and handed out, the old one still signs.
    set_tls_keys(
        &w.broker.config_path,
        &base_config,
        &format!(
            "extra_trusted_ca_files = [{:?}]\n",
            new_ca.to_str().unwrap()
        ),
    );
    let next = restart(&mut w.broker).await;
    // The stopped broker's temp dir holds the config and data dir the new one uses: keep it.
    stopped.push(std::mem::replace(&mut w.broker, next));
    w.tls = tls_addr(&mut w.broker).await;
    assert_eq!(
        whoami(&mtls_client(&old_agent), w.tls).await,
        Ok("cert-bot".into())
    );
    let token = join_token(&w.broker.url, "cert-bot").await;
    let (code, out, err) = agent_enroll(&w.broker.url, &token, &new_agent).await;
    assert_eq!(code, 0, "{out}{err}");
    let bundle = std::fs::read_to_string(new_agent.join("ca.pem")).unwrap();
    assert_eq!(
        bundle.matches("BEGIN CERTIFICATE").count(),
        2,
        "enrollment hands out both CAs during the rotation: {bundle}"
    );

    // 2. Switch: the new CA signs the server certificate and new client certificates; the
    // old CA's client certificates keep working.
    set_tls_keys(
        &w.broker.config_path,
        &base_config,
        &format!(
            "ca_cert_file = {:?}\nca_key_file = {:?}\nextra_trusted_ca_files = [{:?}]\n",
            new_ca.to_str().unwrap(),
            new_ca_dir.join("ca.key").to_str().unwrap(),
            old_ca.to_str().unwrap()
        ),
    );
    let next = restart(&mut w.broker).await;
    // The stopped broker's temp dir holds the config and data dir the new one uses: keep it.
    stopped.push(std::mem::replace(&mut w.broker, next));
    w.tls = tls_addr(&mut w.broker).await;
    let only_old = client_trusting(&old_agent, &[&old_ca]);
    assert!(
        whoami(&only_old, w.tls).await.is_err(),
        "the server certificate now comes from the new CA"
    );
    // An agent that renewed during step 1 trusts both CAs; its old certificate still works.
    let renewed_trust = client_trusting(&old_agent, &[&old_ca, &new_ca]);
    assert_eq!(whoami(&renewed_trust, w.tls).await, Ok("cert-bot".into()));
    let fresh_dir = home.path().join("fresh");
    let token = join_token(&w.broker.url, "cert-bot").await;
    let (code, out, err) = agent_enroll(&w.broker.url, &token, &fresh_dir).await;
    assert_eq!(code, 0, "{out}{err}");
    // Its certificate chains to the new CA only: trusted once the old CA is retired below.
    let fresh = client_trusting(&fresh_dir, &[&new_ca]);
    assert_eq!(whoami(&fresh, w.tls).await, Ok("cert-bot".into()));

    // 3. Retire the old CA: its certificates are refused at the handshake, the new ones work.
    std::fs::write(
        &w.broker.config_path,
        base_config.replacen(
            "[tls]\n",
            &format!(
                "[tls]\nca_cert_file = {:?}\nca_key_file = {:?}\n",
                new_ca.to_str().unwrap(),
                new_ca_dir.join("ca.key").to_str().unwrap()
            ),
            1,
        ),
    )
    .unwrap();
    let next = restart(&mut w.broker).await;
    // The stopped broker's temp dir holds the config and data dir the new one uses: keep it.
    stopped.push(std::mem::replace(&mut w.broker, next));
    w.tls = tls_addr(&mut w.broker).await;
    let refused = whoami(&client_trusting(&old_agent, &[&old_ca, &new_ca]), w.tls).await;
    assert!(
        refused.is_err(),
        "a retired CA's certificate still works: {refused:?}"
    );
    assert_eq!(
        whoami(&client_trusting(&fresh_dir, &[&new_ca]), w.tls).await,
        Ok("cert-bot".into())
    );
    assert!(
        whoami(&client_trusting(&new_agent, &[&new_ca]), w.tls)
            .await
            .is_err(),
        "the certificate enrolled in step 1 came from the old CA"
    );
}

/// The node's MagicDNS name in the tailscaled-certificate tests.
const TS_DOMAIN: &str = "bot-broker.tailnet-1234.ts.net";

/// A stand-in for Let's Encrypt: a root, an intermediate, and a 90-day certificate from the
/// intermediate for `names`. Returns the root PEM and the pair as tailscaled serves it (SEC1
/// key, leaf then intermediate).
fn public_ca_pair(names: &[&str]) -> (String, botcreds_tests::fake_tailscaled::CertPair) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let now = time::OffsetDateTime::now_utc();
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::default();
    root.distinguished_name
        .push(DnType::CommonName, "Test Public Root X1");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let root_cert = root.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root, root_key);
    let mid_key = KeyPair::generate().unwrap();
    let mut mid = CertificateParams::default();
    mid.distinguished_name
        .push(DnType::CommonName, "Test Public E5");
    mid.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let mid_cert = mid.signed_by(&mid_key, &root_issuer).unwrap();
    let mid_issuer = Issuer::new(mid, mid_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, names[0]);
    leaf.not_before = now - time::Duration::hours(1);
    leaf.not_after = now + time::Duration::days(90);
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = leaf.signed_by(&leaf_key, &mid_issuer).unwrap();
    let pair = botcreds_tests::fake_tailscaled::CertPair::from_pkcs8(
        &leaf_key.serialize_pem(),
        &format!("{}{}", leaf_cert.pem(), mid_cert.pem()),
    );
    (root_cert.pem(), pair)
}

/// A client presenting the certificate in `state_dir`, trusting only `roots_pem`, and reaching
/// `TS_DOMAIN` at the mTLS listener (SNI and Host stay the tailnet name).
fn tailnet_name_client(state_dir: &Path, roots_pem: &[u8], tls: SocketAddr) -> reqwest::Client {
    let identity = std::fs::read(state_dir.join("client.pem")).unwrap();
    reqwest::Client::builder()
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(roots_pem).unwrap())
        .resolve(TS_DOMAIN, tls)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// `[tls] server_certificate = "tailscale"`: the listener presents tailscaled's certificate for
/// the node's MagicDNS name while client certificates still come from the broker's CA; a
/// client needs the public root (not the broker CA) to connect, and so does the agent
/// (`[tls] server_ca_file`). Without tailscaled the broker does not start.
#[tokio::test(flavor = "multi_thread")]
async fn server_certificate_from_tailscaled_for_the_tailnet_name() {
    use botcreds_tests::agent::{AgentBuilder, GithubEntry};
    use botcreds_tests::fake_tailscaled::{FakeTailscaled, SelfNode};

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let tailscaled = FakeTailscaled::start().await;
    tailscaled.set_self(SelfNode::new("bot-broker", "tailnet-1234.ts.net"));
    // The agent binary resolves names through the system, so the certificate also names
    // localhost for it; the reqwest clients below use the tailnet name itself.
    let (root_pem, pair) = public_ca_pair(&[TS_DOMAIN, "localhost"]);
    tailscaled.set_cert_pair(TS_DOMAIN, pair);
    let mut broker = BrokerBuilder::new(AGENT_POLICY)
        .github(&github.base_url(), botcreds_tests::fixtures::APP_ID)
        .api_key("ops", OPS_KEY)
        .tailscaled(tailscaled.socket_path())
        .toml(&format!("{TLS_TOML}server_certificate = \"tailscale\"\n"))
        .start()
        .await;
    let tls = tls_addr(&mut broker).await;
    assert!(
        broker
            .logs()
            .contains("mTLS server certificate from tailscaled"),
        "{}",
        broker.logs()
    );
    assert_eq!(
        tailscaled.cert_requests(),
        vec![format!("{TS_DOMAIN}?type=pair")]
    );
    assert!(
        !broker.logs().contains("PRIVATE KEY"),
        "the key must never be logged"
    );

    let state = tempfile::tempdir().unwrap();
    let token = join_token(&broker.url, "cert-bot").await;
    let (code, _, err) = agent_enroll(&broker.url, &token, state.path()).await;
    assert_eq!(code, 0, "{err}");
    // Enrollment still hands out the broker's CA: it verifies client certificates.
    let ca_bundle = std::fs::read_to_string(state.path().join("ca.pem")).unwrap();
    assert!(!ca_bundle.contains(root_pem.trim()));
    let url = format!("https://{TS_DOMAIN}:{}/v1/whoami", tls.port());

    let public = tailnet_name_client(state.path(), root_pem.as_bytes(), tls);
    let (status, who) = get_json(&public, &url).await.expect("whoami over mTLS");
    assert_eq!(
        (status, who["bot"].as_str()),
        (200, Some("cert-bot")),
        "{who}"
    );

    // Trusting only the broker's CA, the handshake fails: the server certificate is not its.
    let broker_ca_only = tailnet_name_client(state.path(), ca_bundle.as_bytes(), tls);
    let err = get_json(&broker_ca_only, &url)
        .await
        .expect_err("the broker CA does not vouch for tailscaled's certificate");
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // The agent with the public root in `[tls] server_ca_file` gets a credential through
    // the listener.
    let roots_file = state.path().join("public-root.pem");
    std::fs::write(&roots_file, &root_pem).unwrap();
    let home = AgentBuilder::new(&format!("https://localhost:{}", tls.port()))
        .toml(&format!(
            "auth = \"mtls\"\nstate_dir = {:?}\n\n[tls]\nserver_ca_file = {:?}\n",
            state.path().display().to_string(),
            roots_file.display().to_string()
        ))
        .github(GithubEntry::new(
            "github.com",
            &["acme-corp/web"],
            &["contents:write"],
        ))
        .build();
    let agent = home.start().await;
    let out = home
        .helper(
            "get",
            "protocol=http\nhost=github.com\npath=acme-corp/web.git\n",
        )
        .await;
    assert!(
        out.stdout.contains("password=ghs_"),
        "no credential: {}{}\nagent:\n{}",
        out.stdout,
        out.stderr,
        agent.logs()
    );
    drop(agent);

    // Without tailscaled's certificate the broker refuses to start, naming the key.
    tailscaled.set_self(SelfNode::new("bot-broker", "tailnet-1234.ts.net").without_https());
    assert!(broker.stop().await.success());
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(binary("botcreds"));
    cmd.arg("serve")
        .arg("--config")
        .arg(&broker.config_path)
        .env("RUST_LOG", "info")
        .env("BOTCREDS_TEST_KEY_0", OPS_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match BrokerProcess::try_spawn(
        &mut cmd,
        dir,
        broker.config_path.clone(),
        broker.policy_path.clone(),
    )
    .await
    {
        Ok(_) => panic!("the broker started without tailscaled's certificate"),
        Err(f) => {
            assert!(f.logs.contains("tls.server_certificate"), "{}", f.logs);
            assert!(f.logs.contains("enable HTTPS certificates"), "{}", f.logs);
        }
    }
}

/// The fake tailscaled refusing `cert/` (`403 cert access denied`: the broker's user is neither
/// root/operator nor allowed by `TS_PERMIT_CERT_UID`) with `server_certificate = "tailscale"`:
/// the broker does not start, and says why, naming the key; it does not panic.
#[tokio::test(flavor = "multi_thread")]
async fn tailscaled_refusing_the_certificate_stops_the_start_with_a_clear_message() {
    use botcreds_tests::fake_tailscaled::{FakeTailscaled, SelfNode};

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let tailscaled = FakeTailscaled::start().await;
    tailscaled.set_self(SelfNode::new("bot-broker", "tailnet-1234.ts.net"));
    let (_root, pair) = public_ca_pair(&[TS_DOMAIN]);
    tailscaled.set_cert_pair(TS_DOMAIN, pair);
    tailscaled.set_cert_denied(true);
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.yaml");
    std::fs::write(&policy_path, AGENT_POLICY).unwrap();
    std::fs::copy(
        botcreds_tests::fixtures::path("github/test-app-key.pem"),
        dir.path().join("app-key.pem"),
    )
    .unwrap();
    std::fs::set_permissions(
        dir.path().join("app-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let config_path = dir.path().join("broker.toml");
    std::fs::write(
        &config_path,
        format!(
            "listen = [\"127.0.0.1:0\"]\ndata_dir = \"data\"\npolicy = \"policy.yaml\"\n\n\
             [tailscale]\nsocket = {:?}\n\n[github]\napp_id = {}\nprivate_key_file = \"app-key.pem\"\n\
             api_url = \"{}\"\n\n[[api_keys]]\nbot = \"ops\"\nkey_env = \"BOTCREDS_TEST_KEY_0\"\n\n\
             {TLS_TOML}server_certificate = \"tailscale\"\n",
            tailscaled.socket_path().display().to_string(),
            botcreds_tests::fixtures::APP_ID,
            github.base_url()
        ),
    )
    .unwrap();
    let mut cmd = tokio::process::Command::new(binary("botcreds"));
    cmd.arg("serve")
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .env("BOTCREDS_TEST_KEY_0", OPS_KEY)
        .env_remove("BOTCREDS_GITHUB_PRIVATE_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match BrokerProcess::try_spawn(&mut cmd, dir, config_path.clone(), policy_path).await {
        Ok(_) => panic!("the broker started although tailscaled refused the certificate"),
        Err(f) => {
            assert!(f.logs.contains("tls.server_certificate"), "{}", f.logs);
            assert!(f.logs.contains("cert access denied"), "{}", f.logs);
            assert!(!f.logs.contains("panicked"), "{}", f.logs);
            assert!(
                f.status.is_some_and(|s| s.code().is_some()),
                "{:?}",
                f.status
            );
        }
    }
    assert_eq!(tailscaled.cert_requests().len(), 1);
}
