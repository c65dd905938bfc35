//! Negative-security tests of the broker's edge, end to end against the real binary: connection
//! floods (silent HTTP/1 and h2c), anonymous refusal floods and their audit cost, identities
//! that must not be inherited (the broker's own node, a shared-in node with a bot's short
//! name, a renamed node enrolling for a hostname bot), repository names that must not
//! normalise past a deny, and tailscaled refusing WhoIs or certificates.
//!
//! Each refusal case names its input, the code it must get, and checks that nothing stored
//! changed (the store's documents and the audit log's non-refusal events).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::SocketAddr;
use std::time::Duration;

use botcreds_tests::broker::{BrokerBuilder, BrokerProcess};
use botcreds_tests::fake_github::{FakeGithub, FakeGithubConfig};
use botcreds_tests::fake_tailscaled::{FakeTailscaled, NodeBuilder};
use botcreds_tests::world::{World, ip};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const POLICY: &str = r#"
bots:
  ci-bot:
    identity: { tag: "tag:ci" }
    auto_approve:
      - repo: "acme-corp/*"
        permissions: [contents:read]
    deny:
      - repo: "acme-corp/infra"
  builder:
    identity: { type: tailnet, hostname: builder }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
defaults:
  requires_approval: true
"#;

/// The HTTP/2 client preface and an empty SETTINGS frame: what an h2c client sends first.
const H2C_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(from), 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// What the broker did with a fresh connection.
#[derive(Debug, PartialEq)]
enum Fate {
    /// It spoke (the h2 SETTINGS frame, or an HTTP/1 answer): the connection was admitted.
    Admitted,
    /// It closed the connection without a byte: refused.
    Closed,
}

/// Read until the broker either says something or closes the connection; the bound only keeps
/// a broken broker from hanging the test.
async fn first_answer(stream: &mut TcpStream) -> Fate {
    let mut buf = [0u8; 512];
    match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Fate::Closed,
        Ok(Ok(_)) => Fate::Admitted,
        Err(_) => panic!("the broker neither answered nor closed the connection within 30s"),
    }
}

/// A silent h2c connection: preface and settings, then nothing.
async fn h2c_silent(from: &str, to: SocketAddr) -> (TcpStream, Fate) {
    let mut stream = connect_from(from, to).await;
    // A refused connection may already be closed: a failed write is a refusal too.
    if stream.write_all(H2C_PREFACE).await.is_err() {
        return (stream, Fate::Closed);
    }
    let fate = first_answer(&mut stream).await;
    (stream, fate)
}

/// An HTTP/1 keep-alive connection that asked once for /healthz and then stays silent.
async fn http1_kept_alive(from: &str, to: SocketAddr) -> (TcpStream, Fate) {
    let mut stream = connect_from(from, to).await;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {to}\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return (stream, Fate::Closed);
    }
    let fate = first_answer(&mut stream).await;
    (stream, fate)
}

/// Wait until the broker closes `stream` (reads to EOF or a reset).
async fn closed_by_broker(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

async fn healthz_from(broker: &BrokerProcess, from: &str) -> reqwest::StatusCode {
    broker
        .client_from(ip(from))
        .get(format!("{}/healthz", broker.url))
        .send()
        .await
        .expect("healthz answers")
        .status()
}

async fn plain_broker(extra_toml: &str) -> (FakeGithub, FakeTailscaled, BrokerProcess) {
    let w = World::builder(POLICY).toml(extra_toml).start().await;
    (w.github, w.tailscaled, w.broker)
}

/// h2c_connection_exhaustion: one peer's silent connections beyond the per-peer cap (128 by
/// default) are closed at once, HTTP/1 and h2c alike, and /healthz still answers others.
#[tokio::test]
async fn h2c_connection_exhaustion_is_capped_per_peer() {
    let (_github, _tailscaled, broker) = plain_broker("").await;
    let mut held = Vec::new();
    for _ in 0..64 {
        let (stream, fate) = http1_kept_alive("127.0.0.2", broker.addr).await;
        assert_eq!(fate, Fate::Admitted);
        held.push(stream);
    }
    let mut fates = Vec::new();
    for _ in 0..76 {
        let (stream, fate) = h2c_silent("127.0.0.2", broker.addr).await;
        fates.push(fate);
        held.push(stream);
    }
    let admitted = fates.iter().filter(|f| **f == Fate::Admitted).count();
    assert_eq!(
        (admitted, fates.len() - admitted),
        (64, 12),
        "64 HTTP/1 + 64 h2c connections fill the per-peer cap of 128; the rest are refused"
    );
    assert_eq!(healthz_from(&broker, "127.0.0.3").await, 200);
    // Closing some frees their places again.
    held.truncate(100);
    // The broker sees the closes asynchronously: try until a place is free (bounded).
    let reopened = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (stream, fate) = h2c_silent("127.0.0.2", broker.addr).await;
            if fate == Fate::Admitted {
                return stream;
            }
        }
    })
    .await
    .ok();
    assert!(
        reopened.is_some(),
        "closed connections did not free their places"
    );
}

/// h2c_connection_exhaustion as the review found it: a broker at a 256 open-file limit (soft
/// and hard), 300 silent h2c connections from one peer. The broker keeps its connections below
/// the limit (128 in all, 64 per peer), refuses the rest at once, and /healthz answers.
#[tokio::test]
async fn h2c_flood_at_a_low_open_file_limit_leaves_healthz_answering() {
    let World {
        broker,
        github: _github,
        tailscaled: _tailscaled,
        ..
    } = World::builder(POLICY)
        .broker(|b| b.open_file_limit(256))
        .start()
        .await;
    let mut held = Vec::new();
    let mut admitted = 0;
    for _ in 0..300 {
        let (stream, fate) = h2c_silent("127.0.0.2", broker.addr).await;
        if fate == Fate::Admitted {
            admitted += 1;
        }
        held.push(stream);
    }
    assert_eq!(
        admitted, 64,
        "one peer holds at most half of what the file limit leaves"
    );
    for from in ["127.0.0.3", "127.0.0.4"] {
        assert_eq!(healthz_from(&broker, from).await, 200);
    }
    assert!(
        broker.logs().contains("connection limits"),
        "{}",
        broker.logs()
    );
}

/// The total cap holds over all peers, and a connection without a request in flight is closed
/// after `[limits] idle_timeout`: silent HTTP/1 (not one byte sent), h2c after its preface,
/// and an HTTP/1 keep-alive connection after its request.
#[tokio::test]
async fn idle_connections_are_closed_and_the_total_is_capped() {
    let (_github, _tailscaled, broker) = plain_broker(
        "[limits]\nmax_connections = 6\nmax_connections_per_peer = 4\nidle_timeout = \"1s\"\n",
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let (s, fate) = h2c_silent("127.0.0.2", broker.addr).await;
        assert_eq!(fate, Fate::Admitted);
        held.push(s);
    }
    assert_eq!(h2c_silent("127.0.0.2", broker.addr).await.1, Fate::Closed);
    for _ in 0..2 {
        let (s, fate) = h2c_silent("127.0.0.3", broker.addr).await;
        assert_eq!(fate, Fate::Admitted);
        held.push(s);
    }
    assert_eq!(h2c_silent("127.0.0.4", broker.addr).await.1, Fate::Closed);
    // Every one of them is idle: the broker closes them all.
    for (i, s) in held.iter_mut().enumerate() {
        assert!(
            closed_by_broker(s, Duration::from_secs(30)).await,
            "idle h2c connection {i} stayed open"
        );
    }
    let mut silent = connect_from("127.0.0.4", broker.addr).await;
    let (mut kept_alive, fate) = http1_kept_alive("127.0.0.4", broker.addr).await;
    assert_eq!(fate, Fate::Admitted);
    assert!(
        closed_by_broker(&mut silent, Duration::from_secs(30)).await,
        "a connection that never sent a byte stayed open"
    );
    assert!(
        closed_by_broker(&mut kept_alive, Duration::from_secs(30)).await,
        "an idle HTTP/1 keep-alive connection stayed open"
    );
    assert_eq!(healthz_from(&broker, "127.0.0.5").await, 200);
}

/// unauthenticated_refusal_flood_writes_every_event: every anonymous refusal cost one fsync'd
/// audit event. Now per peer and window the first `audited_refusals_per_peer` (10 by default)
/// are written one by one and the rest become one `refusals_summarized` event.
#[tokio::test]
async fn anonymous_refusal_flood_is_summarised_in_the_audit_log() {
    use botcreds_broker::store::{AuditFilter, SledStore, Store};
    use botcreds_proto::audit::AuditEventKind;

    let (_github, _tailscaled, mut broker) = plain_broker("").await;
    let client = broker.client_from(ip("127.0.0.9"));
    let body =
        serde_json::json!({"repositories": ["acme-corp/web"], "permissions": ["contents:read"]});
    for i in 0..50 {
        let mut req = client
            .post(format!("{}/v1/credentials", broker.url))
            .json(&body);
        if i % 5 == 0 {
            req = req.bearer_auth("bck_wrongwrongwrongwrongwrongwrongwr");
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401);
    }
    assert!(broker.stop().await.success());
    let store = SledStore::open(&broker.data_dir()).unwrap();
    let events = store.read_audit(&AuditFilter::default()).unwrap();
    let denied = events
        .iter()
        .filter(|e| e.event == AuditEventKind::CredentialDenied)
        .count();
    assert_eq!(
        denied, 10,
        "only the first ten refusals are written one by one"
    );
    let summaries: Vec<_> = events
        .iter()
        .filter(|e| e.event == AuditEventKind::RefusalsSummarized)
        .collect();
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    assert_eq!(summaries[0].client_ip.as_deref(), Some("127.0.0.9"));
    let detail = summaries[0].detail.as_deref().unwrap();
    assert!(detail.starts_with("40 more"), "{detail}");
    assert_eq!(store.verify_audit_chain().unwrap().first_broken, None);
}

// ---------------------------------------------------------------------------------------------
// Refusals that must change nothing

/// The tagged CI node of our tailnet.
const CI: &str = "127.0.0.2";
/// A node of our tailnet renamed `builder`, like the hostname-identified bot.
const RENAMED: &str = "127.0.0.3";
/// A node shared in from another tailnet whose short name is `builder`.
const SHARED_IN: &str = "127.0.0.6";
/// A node of another tailnet's domain named `builder` (no `Sharer` field).
const OTHER_TAILNET: &str = "127.0.0.7";
/// The broker's own node: its tailnet address, owned by an admin.
const OWN_NODE: &str = "127.0.0.8";

const TABLE_POLICY: &str = r#"
bots:
  ci-bot:
    identity: { tag: "tag:ci" }
    auto_approve:
      - repo: "acme-corp/*"
        permissions: [contents:read]
    deny:
      - repo: "acme-corp/infra"
  builder:
    identity: { type: tailnet, hostname: builder }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
defaults:
  requires_approval: false
"#;

const TABLE_TOML: &str = "[admin]\nusers = [\"alice@example.com\"]\n\n[tls]\nlisten = [\"127.0.0.1:0\"]\n\
    server_names = [\"localhost\"]\nclient_cert_ttl = \"1h\"\ntailnet_enrollment = true\n";

struct Case {
    what: &'static str,
    from: &'static str,
    method: &'static str,
    path: &'static str,
    body: serde_json::Value,
    status: u16,
    code: &'static str,
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn token_request(repos: &[&str]) -> serde_json::Value {
    serde_json::json!({"kind": "github_token", "repositories": repos, "permissions": ["contents:read"]})
}

#[tokio::test]
async fn edge_refusals_have_stable_codes_and_change_nothing() {
    use botcreds_broker::store::{AuditFilter, SledStore, Store};
    use botcreds_proto::audit::AuditEventKind;
    use botcreds_tests::fake_tailscaled::{DEFAULT_TAILNET, SelfNode};
    use serde_json::json;

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let tailscaled = FakeTailscaled::start().await;
    let mut own = SelfNode::new("bot-broker", DEFAULT_TAILNET);
    own.tailscale_ips = vec![ip(OWN_NODE)];
    tailscaled.set_self(own);
    tailscaled.add_node(
        ip(CI),
        NodeBuilder::new("ci-bot-07").tags(["tag:ci"]).build(),
    );
    tailscaled.add_node(
        ip(RENAMED),
        NodeBuilder::new("builder")
            .login("mallory@example.com")
            .build(),
    );
    tailscaled.add_node(
        ip(SHARED_IN),
        NodeBuilder::new("builder")
            .tailnet("other-tailnet.ts.net")
            .shared_in_by(4242)
            .login("eve@other.example")
            .build(),
    );
    tailscaled.add_node(
        ip(OTHER_TAILNET),
        NodeBuilder::new("builder")
            .tailnet("other-tailnet.ts.net")
            .login("eve@other.example")
            .build(),
    );
    tailscaled.add_node(
        ip(OWN_NODE),
        NodeBuilder::new("bot-broker")
            .login("alice@example.com")
            .build(),
    );
    let mut broker = BrokerBuilder::new(TABLE_POLICY)
        .github(&github.base_url(), botcreds_tests::fixtures::APP_ID)
        .tailscaled(tailscaled.socket_path())
        .toml(TABLE_TOML)
        .start()
        .await;

    // Controls: the identities the refusals below rely on do work where they should.
    let whoami = |from: &'static str| {
        let client = broker.client_from(ip(from));
        let url = format!("{}/v1/whoami", broker.url);
        async move {
            let resp = client.get(url).send().await.unwrap();
            (
                resp.status().as_u16(),
                resp.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    assert_eq!(whoami(CI).await.1["bot"], "ci-bot");
    assert_eq!(whoami(RENAMED).await.1["bot"], "builder");
    // hostname_matches_shared_in_node: another tailnet's `builder` is nobody here.
    assert_eq!(whoami(SHARED_IN).await.1["bot"], serde_json::Value::Null);
    assert_eq!(
        whoami(OTHER_TAILNET).await.1["bot"],
        serde_json::Value::Null
    );

    let cases = vec![
        Case {
            what: "infra_git_git_normalises_past_deny",
            from: CI,
            method: "POST",
            path: "/v1/credentials",
            body: token_request(&["acme-corp/infra.git.git"]),
            status: 400,
            code: "invalid_repository",
        },
        Case {
            what: "upper-case .GIT still meets the deny",
            from: CI,
            method: "POST",
            path: "/v1/credentials",
            body: token_request(&["Acme-Corp/INFRA.GIT"]),
            status: 403,
            code: "policy_denied",
        },
        Case {
            what: "hostname_enrollment_for_renamed_node",
            from: RENAMED,
            method: "POST",
            path: "/v1/enroll",
            body: json!({"csr": csr()}),
            status: 403,
            code: "forbidden",
        },
        Case {
            what: "renamed node naming the bot explicitly",
            from: RENAMED,
            method: "POST",
            path: "/v1/enroll",
            body: json!({"bot": "builder", "csr": csr()}),
            status: 403,
            code: "forbidden",
        },
        Case {
            what: "shared-in node with a bot's short name asks for its token",
            from: SHARED_IN,
            method: "POST",
            path: "/v1/credentials",
            body: token_request(&["acme-corp/web"]),
            status: 403,
            code: "policy_denied",
        },
        Case {
            what: "other tailnet's node with a bot's short name asks for its token",
            from: OTHER_TAILNET,
            method: "POST",
            path: "/v1/credentials",
            body: token_request(&["acme-corp/web"]),
            status: 403,
            code: "policy_denied",
        },
        Case {
            what: "shared-in node enrolls as the bot",
            from: SHARED_IN,
            method: "POST",
            path: "/v1/enroll",
            body: json!({"bot": "builder", "csr": csr()}),
            status: 403,
            code: "forbidden",
        },
        Case {
            what: "own_node_inherits_admin: admin route from the broker's own node",
            from: OWN_NODE,
            method: "GET",
            path: "/v1/certs",
            body: serde_json::Value::Null,
            status: 401,
            code: "unauthenticated",
        },
        Case {
            what: "own node creates a join token",
            from: OWN_NODE,
            method: "POST",
            path: "/v1/enroll/tokens",
            body: json!({"bot": "ci-bot"}),
            status: 401,
            code: "unauthenticated",
        },
        Case {
            what: "own node asks for a token",
            from: OWN_NODE,
            method: "POST",
            path: "/v1/credentials",
            body: token_request(&["acme-corp/web"]),
            status: 401,
            code: "unauthenticated",
        },
        Case {
            what: "own node asks who it is",
            from: OWN_NODE,
            method: "GET",
            path: "/v1/whoami",
            body: serde_json::Value::Null,
            status: 401,
            code: "unauthenticated",
        },
    ];
    for case in &cases {
        let client = broker.client_from(ip(case.from));
        let url = format!("{}{}", broker.url, case.path);
        let request = match case.method {
            "GET" => client.get(url),
            _ => client.post(url).json(&case.body),
        };
        let resp = request.send().await.unwrap();
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            (status, body["code"].as_str()),
            (case.status, Some(case.code)),
            "{}: {body}",
            case.what
        );
        assert!(
            body["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{}: no message",
            case.what
        );
    }

    assert_eq!(github.mint_count(), 0, "no refusal minted a token");
    assert!(broker.stop().await.success());
    let store = SledStore::open(&broker.data_dir()).unwrap();
    assert!(store.list_credentials().unwrap().is_empty());
    assert!(store.list_docs("tls.certs").unwrap().is_empty());
    assert!(store.list_docs("tls.join_tokens").unwrap().is_empty());
    let events = store.read_audit(&AuditFilter::default()).unwrap();
    let allowed = [
        AuditEventKind::BrokerStarted,
        AuditEventKind::CredentialRequested,
        AuditEventKind::CredentialDenied,
        AuditEventKind::CertRefused,
        AuditEventKind::RefusalsSummarized,
    ];
    for e in &events {
        assert!(
            allowed.contains(&e.event),
            "a refusal changed something: {e:?}"
        );
    }
}

/// own_node_inherits_admin with `[tailscale] trust_own_node = true`: a caller on the broker's
/// own node is the node for bots (here its owner's user bot), but never an admin, though the
/// node's owner is one.
#[tokio::test]
async fn trusted_own_node_is_a_bot_but_never_an_admin() {
    use botcreds_tests::fake_tailscaled::{DEFAULT_TAILNET, SelfNode};

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let tailscaled = FakeTailscaled::start().await;
    let mut own = SelfNode::new("bot-broker", DEFAULT_TAILNET);
    own.tailscale_ips = vec![ip(OWN_NODE)];
    tailscaled.set_self(own);
    tailscaled.add_node(
        ip(OWN_NODE),
        NodeBuilder::new("bot-broker")
            .login("alice@example.com")
            .build(),
    );
    tailscaled.add_node(
        ip("127.0.0.9"),
        NodeBuilder::new("alice-laptop")
            .login("alice@example.com")
            .build(),
    );
    let policy = "bots:\n  alice-bot:\n    identity: { user: alice@example.com }\n";
    let broker = BrokerBuilder::new(policy)
        .github(&github.base_url(), botcreds_tests::fixtures::APP_ID)
        .tailscaled(tailscaled.socket_path())
        .tailscale_toml("trust_own_node = true\n")
        .toml("[admin]\nusers = [\"alice@example.com\"]\n")
        .start()
        .await;
    let get = |from: &'static str, path: &'static str| {
        let client = broker.client_from(ip(from));
        let url = format!("{}{path}", broker.url);
        async move {
            let resp = client.get(url).send().await.unwrap();
            (
                resp.status().as_u16(),
                resp.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let (status, who) = get(OWN_NODE, "/v1/whoami").await;
    assert_eq!(
        (status, who["bot"].as_str()),
        (200, Some("alice-bot")),
        "{who}"
    );
    let (status, body) = get(OWN_NODE, "/v1/admin/audit").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    // Control: the same owner from her laptop is an admin.
    let (status, body) = get("127.0.0.9", "/v1/admin/audit").await;
    assert_eq!(status, 200, "{body}");
}

/// Regression: connections refused at the caps and connections closed for idleness left no
/// trace an operator could alert on. Now `/metrics` counts them by reason
/// (`botcreds_connections_refused_total{reason}`, `botcreds_connections_closed_idle_total`)
/// and shows the connections open now (`botcreds_connections_open`).
#[tokio::test]
async fn connection_refusals_and_idle_closes_are_counted_in_metrics() {
    let (_github, _tailscaled, broker) = plain_broker(
        "[limits]\nmax_connections = 3\nmax_connections_per_peer = 2\nidle_timeout = \"1s\"\n",
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (s, fate) = h2c_silent("127.0.0.2", broker.addr).await;
        assert_eq!(fate, Fate::Admitted);
        held.push(s);
    }
    assert_eq!(h2c_silent("127.0.0.2", broker.addr).await.1, Fate::Closed);
    let (s, fate) = h2c_silent("127.0.0.3", broker.addr).await;
    assert_eq!(fate, Fate::Admitted);
    held.push(s);
    for _ in 0..2 {
        assert_eq!(h2c_silent("127.0.0.4", broker.addr).await.1, Fate::Closed);
    }
    for (i, s) in held.iter_mut().enumerate() {
        assert!(
            closed_by_broker(s, Duration::from_secs(30)).await,
            "idle h2c connection {i} stayed open"
        );
    }
    let metrics = broker
        .client_from(ip("127.0.0.5"))
        .get(format!("{}/metrics", broker.url))
        .send()
        .await
        .expect("metrics answer")
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = metrics.lines().collect();
    for (line, why) in [
        (
            "botcreds_connections_refused_total{reason=\"peer_cap\"} 1",
            "the third connection from 127.0.0.2",
        ),
        (
            "botcreds_connections_refused_total{reason=\"total_cap\"} 2",
            "both connections from 127.0.0.4",
        ),
        (
            "botcreds_connections_closed_idle_total 3",
            "the three silent connections",
        ),
        (
            "botcreds_connections_open 1",
            "only this scrape's own connection",
        ),
    ] {
        assert!(lines.contains(&line), "{why}: no `{line}` in\n{metrics}");
    }
}
