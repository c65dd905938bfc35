//! mTLS cost: a new connection plus one `POST /v1/credentials`, over the mTLS listener with a
//! full handshake and with TLS session resumption, against the tailnet path (plain HTTP, the
//! caller identified by WhoIs). The broker runs in-process (`server::run`) on loopback with the
//! simulated GitHub (token reuse after the first mint) and a WhoIs that answers from memory, so
//! the difference is the TLS handshake and the certificate check.
//! Run with `cargo bench -p botcreds-broker --bench mtls`; numbers are in docs/benchmarks.md.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark setup: a failure ends the run"
)]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use botcreds_broker::config::{Config, Env};
use botcreds_broker::identity::TailnetIdentity;
use botcreds_broker::identity::tailnet::{WhoIs, WhoIsError};
use botcreds_broker::{dev, server};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

fn main() {
    divan::main();
}

const POLICY: &str = r#"
bots:
  cert-bot:
    identity: { type: mtls }
    auto_approve:
      - repo: "demo-org/app"
        permissions: [contents:read]
  tail-bot:
    identity: { tag: "tag:bench" }
    auto_approve:
      - repo: "demo-org/app"
        permissions: [contents:read]
  ops:
    identity: { type: api_key }
"#;
const OPS_KEY: &str = "bck_benchOpsKey0123456789abcdefghijkl";
const REQUEST: &str =
    r#"{"kind":"github_token","repositories":["demo-org/app"],"permissions":["contents:read"]}"#;

/// Every caller of the plain listener is the tagged node `bench-host`.
struct StaticWhoIs;

#[async_trait::async_trait]
impl WhoIs for StaticWhoIs {
    async fn whois(&self, _: SocketAddr) -> Result<Option<TailnetIdentity>, WhoIsError> {
        Ok(Some(TailnetIdentity {
            stable_id: "nBENCH".into(),
            node_name: "bench-host.example.ts.net".into(),
            computed_name: "bench-host".into(),
            tags: vec!["tag:bench".into()],
            login: "tagged-devices".into(),
            capabilities: Default::default(),
            ..Default::default()
        }))
    }
}

struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

struct World {
    rt: tokio::runtime::Runtime,
    plain: SocketAddr,
    tls: SocketAddr,
    full: Arc<rustls::ClientConfig>,
    resuming: Arc<rustls::ClientConfig>,
    /// One mTLS connection kept alive across iterations.
    kept: tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    _dir: tempfile::TempDir,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(start)
}

fn start() -> World {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("policy.yaml"), POLICY).expect("policy");
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let toml = format!(
        "listen = [\"127.0.0.1:0\"]\ndata_dir = \"data\"\npolicy = \"policy.yaml\"\n\
         [tailscale]\nenabled = false\n[[api_keys]]\nbot = \"ops\"\nkey_sha256 = \"{}\"\n\
         [admin]\napi_key_bots = [\"ops\"]\n\
         [tls]\nlisten = [\"127.0.0.1:{tls_port}\"]\nserver_names = [\"localhost\"]\n",
        botcreds_broker::secret::sha256_hex(OPS_KEY.as_bytes())
    );
    let config = Config::parse("bench.toml", &toml, dir.path(), &NoEnv).expect("config");
    let mut edges = dev::edges();
    edges.whois = Some(Arc::new(StaticWhoIs));
    let plain = rt.block_on(async {
        let listeners = server::bind(&config).await.expect("bind");
        let plain = listeners[0].local_addr().expect("addr");
        tokio::spawn(server::run(
            config,
            edges,
            listeners,
            std::future::pending::<()>(),
        ));
        plain
    });
    let tls: SocketAddr = format!("127.0.0.1:{tls_port}").parse().expect("addr");

    // Enroll cert-bot over the plain listener, as `botcreds-agent enroll` does.
    let (identity, ca) = rt.block_on(enroll(plain));
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("CA");
    }
    let chain = vec![CertificateDer::from_pem_slice(identity.0.as_bytes()).expect("cert")];
    let key = PrivateKeyDer::from_pem_slice(identity.1.as_bytes()).expect("key");
    let client = |resume: bool| {
        let mut c = rustls::ClientConfig::builder()
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .expect("client config");
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        if !resume {
            c.resumption = rustls::client::Resumption::disabled();
        }
        Arc::new(c)
    };
    let full = client(false);
    let kept = rt.block_on(async {
        let stream = TcpStream::connect(tls).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let tls = tokio_rustls::TlsConnector::from(full.clone())
            .connect(ServerName::try_from("localhost").expect("name"), stream)
            .await
            .expect("TLS handshake");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("HTTP handshake");
        tokio::spawn(conn);
        tokio::sync::Mutex::new(sender)
    });
    let world = World {
        rt,
        plain,
        tls,
        full,
        resuming: client(true),
        kept,
        _dir: dir,
    };
    // Each path answers 200, and the resuming client does resume.
    world.rt.block_on(async {
        tailnet_request(world.plain).await;
        mtls_request(world.tls, world.full.clone()).await;
        mtls_request(world.tls, world.resuming.clone()).await;
        let kind = mtls_request(world.tls, world.resuming.clone()).await;
        assert_eq!(kind, Some(rustls::HandshakeKind::Resumed));
    });
    world
}

async fn enroll(plain: SocketAddr) -> ((String, String), String) {
    let http = reqwest::Client::new();
    let base = format!("http://{plain}");
    let token: serde_json::Value = http
        .post(format!("{base}/v1/enroll/tokens"))
        .bearer_auth(OPS_KEY)
        .json(&serde_json::json!({"bot": "cert-bot"}))
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("token JSON");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .expect("CSR");
    let cert: serde_json::Value = http
        .post(format!("{base}/v1/enroll"))
        .json(&serde_json::json!({"token": token["token"], "csr": csr}))
        .send()
        .await
        .expect("enroll")
        .json()
        .await
        .expect("enroll JSON");
    let pem = cert["certificate"]
        .as_str()
        .expect("certificate")
        .to_string();
    let ca = cert["ca_bundle"].as_str().expect("CA bundle").to_string();
    ((pem, key.serialize_pem()), ca)
}

/// One request on `sender`; panics unless it is answered 200.
async fn send(sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) {
    sender.ready().await.expect("connection ready");
    let request = hyper::Request::post("/v1/credentials")
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(REQUEST.as_bytes())))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
}

/// One request on a fresh HTTP/1.1 connection over `io`.
async fn post_once<I>(io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("HTTP handshake");
    let driver = tokio::spawn(conn);
    send(&mut sender).await;
    drop(sender);
    let _ = driver.await;
}

async fn tailnet_request(addr: SocketAddr) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    post_once(stream).await;
}

async fn mtls_request(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Option<rustls::HandshakeKind> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").expect("name"), stream)
        .await
        .expect("TLS handshake");
    let kind = tls.get_ref().1.handshake_kind();
    post_once(tls).await;
    kind
}

/// Plain HTTP on a new connection; the broker asks WhoIs (answered from memory here).
#[divan::bench(sample_count = 200)]
fn tailnet_new_connection() {
    let w = world();
    w.rt.block_on(tailnet_request(w.plain));
}

/// A full TLS 1.3 handshake with client certificate on a new connection.
#[divan::bench(sample_count = 200)]
fn mtls_full_handshake() {
    let w = world();
    w.rt.block_on(mtls_request(w.tls, w.full.clone()));
}

/// A resumed TLS 1.3 session (PSK) on a new connection.
#[divan::bench(sample_count = 200)]
fn mtls_resumed_session() {
    let w = world();
    w.rt.block_on(mtls_request(w.tls, w.resuming.clone()));
}

/// A request on a kept-alive mTLS connection: no handshake, only the per-request certificate
/// check (record, revocation, expiry) on top of the request itself.
#[divan::bench(sample_count = 200)]
fn mtls_keep_alive() {
    let w = world();
    w.rt.block_on(async { send(&mut *w.kept.lock().await).await });
}
