//! End-to-end: the real `botcreds` binary against the fake GitHub and the fake tailscaled.
//! Bots connect from distinct loopback addresses that the fake tailscaled maps to nodes.
//! What needs the real process is here (its log, signals, start-up errors, `--dev`, the CLI,
//! the data on disk); the handler-level cases of the same world run in process in
//! `tests/api/credentials.rs`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use botcreds_proto::ErrorCode;
use botcreds_tests::broker::BrokerProcess;
use botcreds_tests::fake_tailscaled::FakeTailscaled;
use botcreds_tests::scenes::broker::{
    CI, LAPTOP, POLICY, SCRIPT_KEY, STRANGER, setup, token_request,
};
use botcreds_tests::world::{World, code_of, ip};
use serde_json::{Value, json};

async fn world() -> World {
    setup().start().await
}

/// POST /v1/credentials from `from`, returning status and JSON body.
async fn ask(w: &World, from: &str, body: Value) -> (u16, Value) {
    w.ask(from, body).await
}

async fn ask_with(w: &World, from: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    w.ask_with(from, body, key).await
}

/// The fake tailscaled's refusals reach the broker: WhoIs answered `403 whois access denied`
/// (the broker's user lacks read access) or `500 server has no local backend`. Each is a
/// clear `503 identity_unavailable` with a retry hint, never a crash, never another caller's
/// identity; API keys keep working, and identity returns with tailscaled.
#[tokio::test(flavor = "multi_thread")]
async fn tailscaled_refusing_whois_is_identity_unavailable() {
    let w = world().await;
    let req = token_request(&["acme-corp/web"], &["contents:read"]);
    type Mode = fn(&FakeTailscaled, bool);
    // Each mode from a peer not asked about before: positive answers are cached for 5 s.
    let modes: [(&str, Mode, &str, u16); 2] = [
        (
            "whois access denied",
            |t, on| t.set_whois_denied(on),
            STRANGER,
            202,
        ),
        (
            "no local backend",
            |t, on| t.fail_next(if on { u32::MAX } else { 0 }),
            LAPTOP,
            200,
        ),
    ];
    for (what, set, from, back) in modes {
        set(&w.tailscaled, true);
        let client = w.broker.client_from(ip(from));
        let resp = client
            .post(format!("{}/v1/credentials", w.broker.url))
            .json(&req)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers().get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..]),
            "{what}"
        );
        let (s, b) = (resp.status().as_u16(), resp.json::<Value>().await.unwrap());
        assert_eq!(
            (s, code_of(&b)),
            (503, ErrorCode::IdentityUnavailable),
            "{what}: {b}"
        );
        let (s, b) = ask_with(&w, from, req.clone(), Some(SCRIPT_KEY)).await;
        assert_eq!(s, 200, "{what}: API keys do not need tailscaled: {b}");
        set(&w.tailscaled, false);
        let (s, b) = ask(&w, from, req.clone()).await;
        assert_eq!(s, back, "{what}: identity is back: {b}");
    }
    let resp = w
        .broker
        .client_from(ip(STRANGER))
        .get(format!("{}/healthz", w.broker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!w.broker.logs().contains("panicked"), "{}", w.broker.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_reloads_on_change_and_keeps_the_last_good_one() {
    let mut w = world().await;
    let req = token_request(&["acme-corp/web"], &["contents:read"]);
    let (s, b) = ask(&w, STRANGER, req.clone()).await;
    assert_eq!(s, 202, "the defaults ask a human: {b}");

    // A good change: the stranger becomes a bot (file change is noticed without a signal).
    let grown = POLICY.replace(
            "defaults:",
            "  stranger-bot:\n    identity: { user: bob@example.com }\n    auto_approve:\n      - repo: \"acme-corp/web\"\n        permissions: [contents:read]\ndefaults:",
    );
    std::fs::write(&w.broker.policy_path, &grown).unwrap();
    assert!(
        w.broker
            .wait_for_log("policy reloaded", Duration::from_secs(30))
            .await,
        "{}",
        w.broker.logs()
    );
    let (s, b) = ask(&w, STRANGER, req.clone()).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["bot"], "stranger-bot");

    // A bad change (typo): rejected with file:line:col, the last good policy stays.
    std::fs::write(&w.broker.policy_path, grown.replace("auto_approve:\n      - repo: \"acme-corp/web\"\n        permissions: [contents:read]\ndefaults", "auto_aprove: []\ndefaults")).unwrap();
    assert!(
        w.broker
            .wait_for_log("policy reload failed", Duration::from_secs(30))
            .await,
        "{}",
        w.broker.logs()
    );
    assert!(
        w.broker.logs().contains("policy.yaml:"),
        "error names the file: {}",
        w.broker.logs()
    );
    let (s, b) = ask(&w, STRANGER, req.clone()).await;
    assert_eq!(s, 200, "still the last good policy: {b}");

    // SIGHUP forces a reload even of an unchanged file: the typo is reported again.
    let failures = w.broker.log_count("policy reload failed");
    w.broker.signal("HUP");
    assert!(
        wait_for_count(&mut w.broker, "policy reload failed", failures + 1).await,
        "{}",
        w.broker.logs()
    );

    // Back to the original policy.
    let loads = w.broker.log_count("policy reloaded");
    std::fs::write(&w.broker.policy_path, POLICY).unwrap();
    assert!(wait_for_count(&mut w.broker, "policy reloaded", loads + 1).await);
    let (s, b) = ask(&w, STRANGER, req).await;
    assert_eq!(s, 202, "the defaults ask a human again: {b}");
}

async fn wait_for_count(broker: &mut BrokerProcess, needle: &str, n: usize) -> bool {
    broker
        .wait_for_count(needle, n, Duration::from_secs(30))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_in_logs_or_on_disk() {
    let w = world().await;
    let mut tokens = Vec::new();
    for perms in [
        &["contents:read"][..],
        &["contents:write"],
        &["pull_requests:write"],
    ] {
        let (s, b) = ask(&w, CI, token_request(&["acme-corp/web"], perms)).await;
        assert_eq!(s, 200, "{b}");
        tokens.push(b["token"].as_str().unwrap().to_string());
    }
    let (s, _) = ask(
        &w,
        CI,
        token_request(&["acme-corp/infra"], &["contents:read"]),
    )
    .await;
    assert_eq!(s, 403);
    let World { mut broker, .. } = w;
    let status = broker.stop().await;
    assert!(status.success(), "clean exit on SIGTERM");
    let logs = broker.logs();
    let key = botcreds_tests::fixtures::app_private_key_pem();
    let key_line = key.lines().nth(1).unwrap();
    assert!(
        logs.contains("credential issued"),
        "the run was logged:\n{logs}"
    );
    for t in &tokens {
        assert!(!logs.contains(t.as_str()), "token in the log");
        assert!(!logs.contains(&t[4..]), "token body in the log");
    }
    assert!(!logs.contains(key_line), "private key in the log");
    assert!(!logs.contains("eyJ"), "a JWT in the log");
    assert!(!logs.contains(SCRIPT_KEY));
    // Nothing secret in the broker's data directory either.
    let mut files = vec![broker.data_dir()];
    let mut scanned = 0;
    while let Some(p) = files.pop() {
        if p.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                files.push(e.unwrap().path());
            }
        } else {
            let bytes = std::fs::read(&p).unwrap();
            scanned += bytes.len();
            for t in &tokens {
                assert!(
                    !bytes.windows(t.len()).any(|w| w == t.as_bytes()),
                    "token in {}",
                    p.display()
                );
            }
        }
    }
    assert!(scanned > 0, "the data dir holds the audit log");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_config_is_a_startup_error_naming_the_key() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cases = [
        (
            "listen = [\"0.0.0.0:0\"]\ndata_dir = \"d\"\npolicy = \"p.yaml\"\n",
            "listen[0]",
        ),
        (
            "listen = [\"127.0.0.1:0\"]\ndata_dir = \"d\"\npolicy = \"p.yaml\"\ncolour = 1\n",
            "colour",
        ),
        (
            "listen = [\"127.0.0.1:0\"]\ndata_dir = \"d\"\npolicy = \"p.yaml\"\n[github]\napp_id = 1\nprivate_key_file = \"loose.pem\"\n",
            "github.private_key_file",
        ),
        (
            "listen = [\"127.0.0.1:0\"]\ndata_dir = \"d\"\npolicy = \"broken.yaml\"\n[github]\napp_id = 1\nprivate_key_file = \"tight.pem\"\n",
            "broken.yaml:6:23",
        ),
    ];
    for (toml, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.yaml"), "bots: {}\n").unwrap();
        std::fs::write(dir.path().join("broken.yaml"), "bots:\n  a:\n    identity: { type: api_key }\n    auto_approve:\n      - repo: \"o/r\"\n        permissions: [contents:rite]\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        for (name, mode) in [("loose.pem", 0o644), ("tight.pem", 0o600)] {
            let p = dir.path().join(name);
            std::fs::copy(
                botcreds_tests::fixtures::path("github/test-app-key.pem"),
                &p,
            )
            .unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let config = dir.path().join("broker.toml");
        std::fs::write(&config, toml).unwrap();
        let out = tokio::process::Command::new(botcreds_tests::broker::binary("botcreds"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{needle}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{needle}: {stderr}");
        assert!(!stderr.contains("BEGIN RSA"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_log_is_durable_chained_and_names_tokens_by_hash() {
    use botcreds_broker::store::{AuditFilter, SledStore, Store};
    use botcreds_proto::audit::AuditEventKind;

    let w = world().await;
    let (s, issued) = ask(
        &w,
        CI,
        token_request(&["acme-corp/web"], &["contents:read"]),
    )
    .await;
    assert_eq!(s, 200, "{issued}");
    let (s, _) = ask(
        &w,
        CI,
        token_request(&["acme-corp/infra"], &["contents:read"]),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = ask(&w, CI, token_request(&["acme-corp/web"], &["nope:read"])).await;
    assert_eq!(s, 400);
    let World { mut broker, .. } = w;
    assert!(broker.stop().await.success());

    let store = SledStore::open(&broker.data_dir()).expect("open the stopped broker's store");
    let report = store.verify_audit_chain().unwrap();
    assert_eq!(report.first_broken, None);
    let events = store.read_audit(&AuditFilter::default()).unwrap();
    let kinds: Vec<AuditEventKind> = events.iter().map(|e| e.event).collect();
    assert_eq!(kinds[0], AuditEventKind::BrokerStarted);
    let issued_event = events
        .iter()
        .find(|e| e.event == AuditEventKind::CredentialIssued)
        .expect("credential_issued recorded");
    assert_eq!(issued_event.bot.as_deref(), Some("ci-bot"));
    assert_eq!(issued_event.repo.as_deref(), Some("acme-corp/web"));
    assert_eq!(issued_event.permissions, vec!["contents:read"]);
    assert_eq!(issued_event.approval.as_deref(), Some("auto"));
    assert_eq!(
        issued_event.token_id,
        issued["credential_id"].as_str().map(str::to_string)
    );
    assert_eq!(
        issued_event.expires_at,
        issued["expires_at"].as_str().map(str::to_string)
    );
    assert_eq!(issued_event.client_ip.as_deref(), Some(CI));
    assert_eq!(issued_event.reason.as_deref(), Some("e2e"));
    let denied: Vec<_> = events
        .iter()
        .filter(|e| e.event == AuditEventKind::CredentialDenied)
        .collect();
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert_eq!(denied[0].code.as_deref(), Some("policy_denied"));
    assert_eq!(denied[0].rule.as_deref(), Some("bots.ci-bot.deny[0]"));
    assert_eq!(denied[1].code.as_deref(), Some("unknown_permission"));
    let requested = kinds
        .iter()
        .filter(|k| **k == AuditEventKind::CredentialRequested)
        .count();
    assert_eq!(requested, 2, "validated requests are recorded as requested");
    let token = issued["token"].as_str().unwrap();
    let all = serde_json::to_string(&events).unwrap();
    assert!(!all.contains(token), "the audit log never holds a token");
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_broker_works_out_of_the_box() {
    use tokio::io::AsyncBufReadExt;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut child = tokio::process::Command::new(botcreds_tests::broker::binary("botcreds"))
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut url, mut key, mut admin_key, mut warned) = (None, None, None, false);
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            warned |= line.contains("NOT valid on github.com");
            if let Some(u) = line.split("Listening on: ").nth(1) {
                url = u.split_whitespace().next().map(str::to_string);
            }
            if let Some(k) = line.split("API key: ").nth(1) {
                key = Some(k.trim().to_string());
            }
            if let Some(k) = line.split("Admin key: ").nth(1) {
                admin_key = k.split_whitespace().next().map(str::to_string);
            }
            if url.is_some() && key.is_some() && admin_key.is_some() && warned {
                break;
            }
        }
    })
    .await
    .expect("the dev banner appears");
    let (url, key, admin_key) = (url.unwrap(), key.unwrap(), admin_key.unwrap());
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let client = reqwest::Client::new();
    let post = |repo: &str| {
        client
            .post(format!("{url}/v1/credentials"))
            .bearer_auth(&key)
            .json(&json!({"kind":"github_token","repositories":[repo],"permissions":["contents:write"]}))
            .send()
    };
    let ok = post("demo-org/app").await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let body: Value = ok.json().await.unwrap();
    assert!(body["token"].as_str().unwrap().starts_with("ghs_"));
    assert_eq!(
        post("demo-org/infrastructure")
            .await
            .unwrap()
            .status()
            .as_u16(),
        403
    );
    let approval = post("demo-org/sensitive-data").await.unwrap();
    assert_eq!(approval.status().as_u16(), 202);
    let approval: Value = approval.json().await.unwrap();
    assert_eq!(approval["state"], "PENDING");
    let id = approval["request_id"].as_str().unwrap().to_string();

    // The printed admin key drives the admin CLI, as the banner says.
    let admin = |args: &[&str]| {
        std::process::Command::new(botcreds_tests::broker::binary("botcreds"))
            .args(args)
            .env("BOTCREDS_BROKER", &url)
            .env("BOTCREDS_API_KEY", &admin_key)
            .output()
            .unwrap()
    };
    let pending = admin(&["pending"]);
    let table = String::from_utf8_lossy(&pending.stdout);
    assert!(pending.status.success() && table.contains(&id), "{table}");
    let approved = admin(&["approve", &id]);
    assert!(
        approved.status.success(),
        "{}",
        String::from_utf8_lossy(&approved.stderr)
    );
    let granted = post("demo-org/sensitive-data").await.unwrap();
    assert_eq!(granted.status().as_u16(), 200);
    // The demo bot's key is not an admin's.
    let as_bot = std::process::Command::new(botcreds_tests::broker::binary("botcreds"))
        .arg("pending")
        .env("BOTCREDS_BROKER", &url)
        .env("BOTCREDS_API_KEY", &key)
        .output()
        .unwrap();
    assert!(!as_bot.status.success());
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_check_and_explain_cli() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("policy.yaml");
    std::fs::write(&good, POLICY).unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        POLICY.replace(
            "contents:read]\n    requires",
            "contents:reed]\n    requires",
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(botcreds_tests::broker::binary("botcreds"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = run(&["policy", "check", good.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("3 bots"), "{out}");
    let (ok, out) = run(&["policy", "check", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        out.contains("bad.yaml:") && out.contains("contents:reed"),
        "{out}"
    );

    let p = good.to_str().unwrap();
    // (bot, repository, permissions, succeeds, expected words)
    type Case<'a> = (Option<&'a str>, &'a str, &'a str, bool, &'a [&'a str]);
    let cases: &[Case] = &[
        (
            Some("ci-bot"),
            "acme-corp/infra",
            "contents:read",
            true,
            &["DENY", "bots.ci-bot.deny[0]"],
        ),
        (
            Some("ci-bot"),
            "acme-corp/web",
            "contents:write,pull_requests:write",
            true,
            &["ALLOW", "bots.ci-bot.auto_approve[0]"],
        ),
        (
            None,
            "acme-corp/web",
            "contents:read",
            true,
            &["REQUIRES APPROVAL", "defaults"],
        ),
        (
            Some("nobody"),
            "acme-corp/web",
            "contents:read",
            false,
            &["no bot"],
        ),
    ];
    for (bot, repo, perms, succeeds, words) in cases {
        let mut args = vec![
            "policy",
            "explain",
            "--policy",
            p,
            "--repo",
            repo,
            "--permissions",
            perms,
        ];
        if let Some(b) = bot {
            args.extend(["--bot", b]);
        }
        let (ok, out) = run(&args);
        assert_eq!(ok, *succeeds, "{args:?}: {out}");
        for w in *words {
            assert!(out.contains(w), "{args:?}: missing {w} in {out}");
        }
    }
}
