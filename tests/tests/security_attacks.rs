//! Negative security suite by attack class, against the real `botcreds` binary (and, for the
//! git helper, the real `botcreds-agent` and `git-credential-botcreds`): slow clients and bad
//! bodies (the mTLS listener's address is in the log), hostile git credential input. The
//! handler-level classes (spoofed identities, the admin routes, policy tricks, forged approval
//! forms, the key-provisioner API and Coder, mTLS enrollment) run in process in
//! `tests/api/attacks.rs`, on the same world and tables (`botcreds_tests::scenes::attacks`).
//!
//! Each class is one test with a table. A row is the attack as sent, the HTTP status and stable
//! error code it must be refused with, and the check that nothing stored changed: pending
//! approvals, grants, remembered rules, GitHub's mint count, LiteLLM's keys, client
//! certificates — and that the audit log grew by refusal events only.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::SocketAddr;
use std::time::Duration;

use botcreds_proto::ErrorCode;
use botcreds_proto::approval::AuditList;
use botcreds_proto::audit::AuditEventKind;
use botcreds_tests::agent::{AgentBuilder, GithubEntry};
use botcreds_tests::broker::BrokerBuilder;
use botcreds_tests::fake_github::{FakeGithub, FakeGithubConfig};
use botcreds_tests::fake_tailscaled::{FakeTailscaled, NodeBuilder};
use botcreds_tests::scenes::attacks::*;
use botcreds_tests::world::{World, ip};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

async fn world(limits: &str) -> World {
    setup(limits).start().await
}

// ---------------------------------------------------------------------------------------------
// Slow clients and bad bodies

/// A TCP connection to the broker from `from`.
async fn connect_from(w: &World, from: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(ip(from), 0)).unwrap();
    socket.connect(w.broker.addr).await.unwrap()
}

/// Reads until the broker closes the connection (bounded); what it sent.
async fn read_to_close(stream: &mut TcpStream, what: &str) -> String {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(45), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "{what}: the broker kept the connection open; it sent: {}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_and_bad_bodies_are_cut_off() {
    let mut w = world(
        "[limits]\nrequest_timeout = \"5s\"\nidle_timeout = \"3s\"\nheader_read_timeout = \"3s\"\n",
    )
    .await;
    assert!(
        w.broker
            .wait_for_log("botcreds mTLS listening", Duration::from_secs(60))
            .await
    );
    let credentials = || req(CI, "POST", "/v1/credentials");
    use ErrorCode::*;
    let rows = vec![
        row(
            "a body over 64 KiB",
            credentials().raw(
                Some("application/json"),
                format!(
                    "{{\"kind\": \"github_token\", \"repositories\": [\"acme-corp/web\"], \
                     \"permissions\": [\"contents:read\"], \"reason\": \"{}\"}}",
                    "x".repeat(70 * 1024)
                ),
            ),
            Expect::Api(BodyTooLarge),
        ),
        row(
            "invalid JSON",
            credentials().raw(Some("application/json"), "{\"kind\": \"github_token\","),
            Expect::Api(InvalidJson),
        ),
        row(
            "trailing garbage after the JSON",
            credentials().raw(
                Some("application/json"),
                "{\"kind\": \"github_token\", \"repositories\": [\"acme-corp/web\"], \
                 \"permissions\": [\"contents:read\"]} {\"kind\": \"github_token\"}",
            ),
            Expect::Api(InvalidJson),
        ),
        row(
            "bytes that are not UTF-8",
            credentials().raw(
                Some("application/json"),
                b"{\"kind\": \"\xff\xfe\"}".to_vec(),
            ),
            Expect::Api(InvalidJson),
        ),
        row(
            "JSON nested deeper than the parser allows",
            credentials().raw(
                Some("application/json"),
                format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
            ),
            Expect::Api(InvalidJson),
        ),
        row(
            "a text/plain body",
            credentials().raw(
                Some("text/plain"),
                credential_request(&["acme-corp/web"], &["contents:read"]).to_string(),
            ),
            Expect::Api(UnsupportedMediaType),
        ),
        row(
            "a form body",
            credentials().raw(
                Some("application/x-www-form-urlencoded"),
                "kind=github_token&repositories=acme-corp/web",
            ),
            Expect::Api(UnsupportedMediaType),
        ),
        row(
            "no content type",
            credentials().raw(
                None,
                credential_request(&["acme-corp/web"], &["contents:read"]).to_string(),
            ),
            Expect::Api(UnsupportedMediaType),
        ),
        row(
            "an unknown field",
            credentials().json(
                json!({"kind": "github_token", "repositories": ["acme-corp/web"],
                "permissions": ["contents:read"], "admin": true}),
            ),
            Expect::Api(InvalidRequest),
        ),
        row(
            "a duplicate field",
            credentials().raw(
                Some("application/json"),
                "{\"kind\": \"github_token\", \"repositories\": [\"acme-corp/web\"], \
                 \"repositories\": [\"acme-corp/infra\"], \"permissions\": [\"contents:read\"]}",
            ),
            Expect::Api(InvalidRequest),
        ),
        row(
            "a string where a list belongs",
            credentials().json(
                json!({"kind": "github_token", "repositories": "acme-corp/web",
                "permissions": ["contents:read"]}),
            ),
            Expect::Api(InvalidRequest),
        ),
        row(
            "no kind",
            credentials().json(json!({"repositories": ["acme-corp/web"],
                "permissions": ["contents:read"]})),
            Expect::Api(InvalidKind),
        ),
        row(
            "a kind the broker does not serve",
            credentials().json(
                json!({"kind": "ssh_deploy_key", "repositories": ["acme-corp/web"],
                "permissions": ["contents:read"]}),
            ),
            Expect::Api(InvalidKind),
        ),
        row(
            "a reason over 1 KiB",
            credentials().json(
                json!({"kind": "github_token", "repositories": ["acme-corp/web"],
                "permissions": ["contents:read"], "reason": "r".repeat(2000)}),
            ),
            Expect::Api(InvalidReason),
        ),
        row(
            "a reason with a terminal escape",
            credentials().json(
                json!({"kind": "github_token", "repositories": ["acme-corp/web"],
                "permissions": ["contents:read"], "reason": "fix\u{1b}[2Jbuild"}),
            ),
            Expect::Api(InvalidReason),
        ),
        row(
            "a reason with a newline (forged log lines)",
            credentials().json(
                json!({"kind": "github_token", "repositories": ["acme-corp/web"],
                "permissions": ["contents:read"],
                "reason": "ok\ncredential_issued bot=ops repo=acme-corp/infra"}),
            ),
            Expect::Api(InvalidReason),
        ),
        row(
            "a reason with a NUL",
            credentials().json(
                json!({"kind": "github_token", "repositories": ["acme-corp/web"],
                "permissions": ["contents:read"], "reason": "a\u{0}b"}),
            ),
            Expect::Api(InvalidReason),
        ),
        row(
            "a ttl that overflows",
            credentials().json(
                json!({"kind": "github_token", "repositories": ["acme-corp/web"],
                "permissions": ["contents:read"], "ttl": "99999999999999999999h"}),
            ),
            Expect::Api(InvalidTtl),
        ),
        row(
            "a ttl longer than a token lives",
            credentials().json(
                json!({"kind": "github_token", "repositories": ["acme-corp/web"],
                "permissions": ["contents:read"], "ttl": "2h"}),
            ),
            Expect::Api(TtlTooLong),
        ),
        row(
            "a replaces that is no credential id",
            credentials().json(
                json!({"kind": "github_token", "repositories": ["acme-corp/infra"],
                "permissions": ["contents:read"], "replaces": "../../etc/passwd"}),
            ),
            Expect::Api(PolicyDenied),
        ),
    ];
    let n = run_table(&w, rows).await;

    // A body that arrives too slowly: the request timeout answers 408 and nothing is stored.
    let before = stored(&w).await;
    let audit_len = audit(&w).await.len();
    let mut slow = connect_from(&w, CI).await;
    slow.write_all(
        b"POST /v1/credentials HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n\
          Content-Length: 200\r\n\r\n{\"kind\": \"github_token\",",
    )
    .await
    .unwrap();
    let answer = read_to_close(&mut slow, "a slow body").await;
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "a slow body gets 408: {answer}"
    );
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert_refusal_only(&w, "a slow body", &before, audit_len).await;

    // Slowloris: part of the headers, then nothing. The header read timeout (fixed in
    // server.rs; there is no [limits] key for it) closes the connection.
    let mut loris = connect_from(&w, UNKNOWN).await;
    loris
        .write_all(b"POST /v1/credentials HTTP/1.1\r\nHost: broker\r\nX-Slow: ")
        .await
        .unwrap();
    let _ = read_to_close(&mut loris, "slowloris").await;
    // Regression: a connection that never sends a byte is closed after `idle_timeout` (hyper's
    // header timer only starts at a request's first byte).
    let mut idle = connect_from(&w, UNKNOWN).await;
    let _ = read_to_close(&mut idle, "a silent connection").await;

    // On the mTLS listener a silent connection is cut by the TLS handshake timeout.
    let tls_addr: SocketAddr = w
        .broker
        .logs()
        .lines()
        .filter(|l| l.contains("botcreds mTLS listening"))
        .find_map(|l| {
            let start = l.find("addr=")? + 5;
            l[start..].split_whitespace().next()?.parse().ok()
        })
        .expect("the mTLS listener's address in the log");
    let mut silent_tls = TcpStream::connect(tls_addr).await.unwrap();
    let _ = read_to_close(&mut silent_tls, "a silent connection to the mTLS listener").await;

    // A connection that goes quiet after a request (kept alive) is closed too, or idle
    // sockets would eat the broker's descriptors.
    let mut kept = connect_from(&w, UNKNOWN).await;
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: broker\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut kept, "a quiet keep-alive connection").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (s, text) = send(&w, &req(UNKNOWN, "GET", "/healthz")).await;
    assert_eq!(s, 200, "the broker still answers after a slowloris: {text}");
    assert_refusal_only(&w, "slowloris", &before, audit_len).await;
    eprintln!("slow clients and bad bodies: {} rows", n + 4);
}

// ---------------------------------------------------------------------------------------------
// git helper injection

const AGENT_POLICY: &str = r#"
bots:
  build-bot:
    identity: { tag: "tag:bots" }
    deny:
      - repo: "acme-corp/infra"
    auto_approve:
      - repo: "acme-corp/*"
        permissions: [contents:read]
  ops:
    identity: { type: api_key }
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

/// What the helper must do with a hostile description.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Helper {
    /// Print no credential, and the broker hears nothing.
    Silent,
    /// Print nothing or the acme-corp/web token already held, and the broker hears nothing.
    HeldWebTokenAtMost,
    /// The broker is asked for exactly acme-corp/infra (no wider), refuses; no credential.
    DeniedInfra,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_git_credential_input_widens_nothing() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let tailscaled = FakeTailscaled::start().await;
    tailscaled.add_node(
        ip("127.0.0.1"),
        NodeBuilder::new("bot-host").tags(["tag:bots"]).build(),
    );
    let broker = BrokerBuilder::new(AGENT_POLICY)
        .github(&github.base_url(), botcreds_tests::fixtures::APP_ID)
        .tailscaled(tailscaled.socket_path())
        .api_key("ops", OPS_KEY)
        .toml("[admin]\napi_key_bots = [\"ops\"]\n")
        .start()
        .await;
    let home = AgentBuilder::new(&broker.url)
        .github(
            GithubEntry::new("github.com", &["acme-corp/web"], &["contents:read"])
                .protocol("https"),
        )
        .github(
            GithubEntry::new("github.com", &["acme-corp/*"], &["contents:read"]).protocol("https"),
        )
        .build();
    let agent = home.start().await;
    let audit_of = |broker_url: String| async move {
        let v: Value = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("{broker_url}/v1/admin/audit?limit=10000"))
            .bearer_auth(OPS_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        serde_json::from_value::<AuditList>(v).unwrap().events
    };

    // The token for acme-corp/web, fetched the honest way.
    let out = home
        .helper("get", "protocol=https\nhost=github.com\n\n")
        .await;
    let web_token = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("password="))
        .unwrap_or_else(|| panic!("no token for the honest request: {}", out.stderr))
        .to_string();

    let long = format!(
        "protocol=https\nhost=github.com\npath={}\n",
        "a".repeat(70_000)
    );
    let rows: Vec<(&str, String, Helper)> = vec![
        (
            "a NUL in the path",
            "protocol=https\nhost=github.com\npath=acme-corp/infra\0/web.git\n".into(),
            Helper::Silent,
        ),
        (
            "a carriage return inside the path",
            "protocol=https\nhost=github.com\npath=acme-corp/in\rfra.git\n".into(),
            Helper::Silent,
        ),
        (
            "a newline smuggled into url= as %0A",
            "url=https://github.com/acme-corp/web%0Ahost=evil.example\n".into(),
            Helper::Silent,
        ),
        (
            "a line without =",
            "protocol=https\nhost github.com\n".into(),
            Helper::Silent,
        ),
        ("a line over 64 KiB", long, Helper::Silent),
        (
            "protocol=http",
            "protocol=http\nhost=github.com\npath=acme-corp/web.git\n".into(),
            Helper::Silent,
        ),
        (
            "a host that is not GitHub",
            "protocol=https\nhost=evil.example\npath=acme-corp/web.git\n".into(),
            Helper::Silent,
        ),
        (
            "a host that only starts like GitHub",
            "protocol=https\nhost=github.com.evil.example\n".into(),
            Helper::Silent,
        ),
        (
            "a host with a port",
            "protocol=https\nhost=github.com:8443\n".into(),
            Helper::Silent,
        ),
        (
            "userinfo in the host",
            "protocol=https\nhost=github.com@evil.example\n".into(),
            Helper::Silent,
        ),
        (
            "url= pointing at another host",
            "url=https://evil.example/acme-corp/web.git\n".into(),
            Helper::Silent,
        ),
        (
            "a .. repository name",
            "protocol=https\nhost=github.com\npath=acme-corp/../infra.git\n".into(),
            Helper::Silent,
        ),
        (
            "a .. owner",
            "protocol=https\nhost=github.com\npath=../acme-corp/infra.git\n".into(),
            Helper::Silent,
        ),
        (
            "an encoded slash",
            "protocol=https\nhost=github.com\npath=acme-corp%2Finfra.git\n".into(),
            Helper::Silent,
        ),
        (
            "a wildcard path",
            "url=https://github.com/acme-corp/*\n".into(),
            Helper::Silent,
        ),
        (
            "traversal after an allowed repository",
            "protocol=https\nhost=github.com\npath=acme-corp/web/../../acme-corp/infra.git\n"
                .into(),
            Helper::HeldWebTokenAtMost,
        ),
        (
            "a password offered for the allowed repository",
            "protocol=https\nhost=github.com\nusername=x-access-token\npassword=ghs_forged\n"
                .into(),
            Helper::HeldWebTokenAtMost,
        ),
        (
            "url= with embedded credentials for the denied repository",
            "url=https://x-access-token:ghs_stolen@github.com/acme-corp/infra.git\n".into(),
            Helper::DeniedInfra,
        ),
        (
            "the denied repository in upper case",
            "protocol=https\nhost=github.com\npath=ACME-CORP/INFRA.git\n".into(),
            Helper::DeniedInfra,
        ),
        (
            "the denied repository with .GIT",
            "protocol=https\nhost=github.com\npath=acme-corp/Infra.GIT\n".into(),
            Helper::DeniedInfra,
        ),
        (
            "url= replacing an allowed path with the denied one",
            "protocol=https\nhost=github.com\npath=acme-corp/web.git\n\
             url=https://github.com/acme-corp/infra.git\n"
                .into(),
            Helper::DeniedInfra,
        ),
    ];
    let n = rows.len();
    for (name, input, expect) in rows {
        let mints = github.mint_count();
        let audit_len = audit_of(broker.url.clone()).await.len();
        let out = home.helper("get", &input).await;
        assert!(out.success, "{name}: the helper always exits 0");
        let password = out.stdout.lines().find_map(|l| l.strip_prefix("password="));
        match expect {
            Helper::Silent | Helper::DeniedInfra => {
                assert_eq!(password, None, "{name}: a credential was printed");
            }
            Helper::HeldWebTokenAtMost => {
                if let Some(p) = password {
                    assert_eq!(p, web_token, "{name}: another token than web's");
                }
            }
        }
        assert_eq!(github.mint_count(), mints, "{name}: a token was minted");
        let added = audit_of(broker.url.clone()).await.split_off(audit_len);
        match expect {
            Helper::Silent | Helper::HeldWebTokenAtMost => {
                assert!(added.is_empty(), "{name}: the broker was asked: {added:?}");
            }
            Helper::DeniedInfra => {
                assert!(
                    added
                        .iter()
                        .any(|e| e.event == AuditEventKind::CredentialDenied),
                    "{name}: no refusal at the broker: {added:?}"
                );
                for e in &added {
                    assert!(
                        REFUSAL_EVENTS.contains(&e.event),
                        "{name}: not a refusal: {e:?}"
                    );
                    let asked: Vec<&str> = e
                        .repo
                        .iter()
                        .chain(e.repositories.iter())
                        .map(String::as_str)
                        .collect();
                    assert!(
                        !asked.is_empty() && asked.iter().all(|r| *r == "acme-corp/infra"),
                        "{name}: the broker was asked for something else: {e:?}"
                    );
                    assert_eq!(
                        e.code.as_deref(),
                        (e.event == AuditEventKind::CredentialDenied)
                            .then_some(ErrorCode::PolicyDenied.as_str()),
                        "{name}: not refused by the deny rule: {e:?}"
                    );
                }
            }
        }
    }
    let (status, logs) = agent.stop().await;
    assert!(status.success(), "{logs}");
    assert!(
        !logs.contains(&web_token),
        "the token reached the agent's log"
    );
    eprintln!("git helper: {n} rows");
}
