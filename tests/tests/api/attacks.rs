//! In process: the handler-level classes of `security_attacks` — spoofed identities, the admin
//! routes, policy tricks, forged approval forms, the key-provisioner API and Coder, mTLS
//! enrollment — on its world and tables (`botcreds_tests::scenes::attacks`). Each class is
//! one test with a table: the attack as sent, the stable code it must be refused with, and
//! that nothing stored changed.

use std::time::Duration;

use botcreds_proto::ErrorCode;
use botcreds_tests::inprocess::InProcessBroker;
use botcreds_tests::scenes::attacks::*;
use botcreds_tests::world::World;
use serde_json::{Value, json};

async fn world(limits: &str) -> World<InProcessBroker> {
    setup(limits).start_in_process().await
}

// ---------------------------------------------------------------------------------------------
// Spoofed identities

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spoofed_identities_are_refused() {
    let w = world("").await;
    let ci_request = pending_request(&w).await;
    let ask = credential_request(&["acme-corp/web"], &["contents:read"]);
    let credentials = || req(UNKNOWN, "POST", "/v1/credentials").json(ask.clone());
    let admin_list = |from| req(from, "GET", "/v1/admin/approvals");
    use ErrorCode::*;
    let rows = vec![
        row(
            "X-Forwarded-For naming ci-bot's node",
            credentials().header("x-forwarded-for", CI),
            Expect::Api(Unauthenticated),
        ),
        row(
            "X-Real-IP naming ci-bot's node",
            credentials().header("x-real-ip", CI),
            Expect::Api(Unauthenticated),
        ),
        row(
            "Forwarded: for= naming ci-bot's node",
            credentials().header("forwarded", format!("for={CI};proto=https")),
            Expect::Api(Unauthenticated),
        ),
        row(
            "Tailscale-User-* headers claiming alice, from an unknown address",
            admin_list(UNKNOWN)
                .header("tailscale-user-login", "alice@example.com")
                .header("tailscale-user-name", "Alice")
                .header("tailscale-app-capabilities", "{\"tag:ops\":[{}]}"),
            Expect::Api(Unauthenticated),
        ),
        row(
            "a bot's node with X-Forwarded-For naming alice's node",
            admin_list(CI)
                .header("x-forwarded-for", ALICE)
                .header("x-real-ip", ALICE),
            Expect::Api(Forbidden),
        ),
        row(
            "a bot's node with Tailscale-User-Login of an admin",
            admin_list(CI).header("tailscale-user-login", "alice@example.com"),
            Expect::Api(Forbidden),
        ),
        row(
            "a wrong API key from an admin's node does not fall back to the node",
            admin_list(ALICE).header("authorization", "Bearer bck_wrongKey0123456789abcdefghijk"),
            Expect::Api(InvalidApiKey),
        ),
        row(
            "an empty Bearer from an admin's node",
            admin_list(ALICE).header("authorization", "Bearer "),
            Expect::Api(InvalidApiKey),
        ),
        row(
            "the admin key in the query string",
            req(
                UNKNOWN,
                "GET",
                format!("/v1/admin/approvals?api_key={OPS_KEY}"),
            ),
            Expect::Api(Unauthenticated),
        ),
        row(
            "a bot's key in the query string of /v1/credentials",
            req(
                UNKNOWN,
                "POST",
                format!("/v1/credentials?api_key={REVIEW_KEY}&access_token={REVIEW_KEY}"),
            )
            .json(ask.clone()),
            Expect::Api(Unauthenticated),
        ),
        row(
            "the admin key as Basic auth",
            admin_list(UNKNOWN).header(
                "authorization",
                format!(
                    "Basic {}",
                    base64_encode(format!("ops:{OPS_KEY}").as_bytes())
                ),
            ),
            Expect::Api(InvalidApiKey),
        ),
        row(
            "the admin key without the space after Bearer",
            admin_list(UNKNOWN).header("authorization", format!("Bearer{OPS_KEY}")),
            Expect::Api(InvalidApiKey),
        ),
        row(
            "the admin key in X-Api-Key",
            admin_list(UNKNOWN).header("x-api-key", OPS_KEY),
            Expect::Api(Unauthenticated),
        ),
        row(
            "an unknown tailnet address asks for a token",
            credentials(),
            Expect::Api(Unauthenticated),
        ),
        row(
            "a tagged node owned by an admin user is not that admin",
            admin_list(TAGGED_ALICE),
            Expect::Api(Forbidden),
        ),
        row(
            "a user with a look-alike admin login",
            admin_list(LOOKALIKE),
            Expect::Api(Forbidden),
        ),
        row(
            "a user whose login is the admin tag's text",
            admin_list(TAG_LOGIN),
            Expect::Api(Forbidden),
        ),
        row(
            "a user with no role",
            admin_list(CAROL),
            Expect::Api(Forbidden),
        ),
        row(
            "another bot polls ci-bot's approval request",
            req(UNKNOWN, "GET", format!("/v1/requests/{ci_request}"))
                .header("authorization", format!("Bearer {REVIEW_KEY}")),
            Expect::Api(UnknownRequest),
        ),
        row(
            "a user node polls ci-bot's approval request",
            req(CAROL, "GET", format!("/v1/requests/{ci_request}")),
            Expect::Api(UnknownRequest),
        ),
        row(
            "an unknown node polls ci-bot's approval request with ci-bot's forwarded address",
            req(UNKNOWN, "GET", format!("/v1/requests/{ci_request}")).header("x-forwarded-for", CI),
            Expect::Api(Unauthenticated),
        ),
    ];
    let n = run_table(&w, rows).await;
    // The admin key itself works, so the refusals above were about the attack, not the key.
    let v = ops_get(&w, "/v1/admin/approvals").await;
    assert!(v["requests"].is_array());
    eprintln!("spoofed identities: {n} rows");
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// ---------------------------------------------------------------------------------------------
// Admin routes

/// Every admin route of `broker/src/api/admin.rs`, the admin key and enrollment routes, with a
/// body for the POSTs.
fn admin_routes(id: &str) -> Vec<(&'static str, String, Option<Value>)> {
    vec![
        ("GET", "/v1/admin/approvals".into(), None),
        (
            "POST",
            "/v1/admin/approvals/approve-all".into(),
            Some(json!({"bot": "ci-bot", "persist": true})),
        ),
        ("GET", format!("/v1/admin/approvals/{id}"), None),
        (
            "POST",
            format!("/v1/admin/approvals/{id}/approve"),
            Some(json!({"persist": true})),
        ),
        (
            "POST",
            format!("/v1/admin/approvals/{id}/deny"),
            Some(json!({"reason": "no"})),
        ),
        ("GET", "/v1/admin/audit".into(), None),
        (
            "POST",
            "/v1/admin/revoke".into(),
            Some(json!({"bot": "ci-bot"})),
        ),
        ("GET", "/v1/admin/grants".into(), None),
        ("GET", "/v1/admin/bots".into(), None),
        ("GET", "/v1/admin/policy".into(), None),
        ("DELETE", "/v1/admin/policy/remembered/rr_0123".into(), None),
        ("GET", "/v1/keys".into(), None),
        (
            "POST",
            "/v1/keys".into(),
            Some(json!({"scope": "ci", "name": "stolen"})),
        ),
        ("DELETE", "/v1/keys/stolen".into(), None),
        ("POST", "/v1/keys/stolen/rotate".into(), Some(json!({}))),
        (
            "POST",
            "/v1/enroll/tokens".into(),
            Some(json!({"bot": "cert-bot", "admin": true})),
        ),
        ("GET", "/v1/certs".into(), None),
        (
            "POST",
            "/v1/certs/revoke".into(),
            Some(json!({"bot": "cert-bot"})),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_routes_refuse_everyone_but_admins() {
    let w = world("").await;
    let id = pending_request(&w).await;
    use ErrorCode::*;
    let mut rows = Vec::new();
    for (method, path, body) in admin_routes(&id) {
        let callers: [(&'static str, &'static str, Option<&str>, ErrorCode); 4] = [
            ("a bot's node", CI, None, Forbidden),
            ("a bot's API key", UNKNOWN, Some(REVIEW_KEY), Forbidden),
            ("an unknown node", UNKNOWN, None, Unauthenticated),
            (
                "a wrong key",
                ALICE,
                Some("bck_wrongKey0123456789abcdefghijk"),
                InvalidApiKey,
            ),
        ];
        for (who, from, key, code) in callers {
            let mut r = req(from, method, path.clone());
            if let Some(key) = key {
                r = r.header("authorization", format!("Bearer {key}"));
            }
            if let Some(b) = &body {
                r = r.json(b.clone());
            }
            rows.push(row(
                format!("{method} {path} by {who}"),
                r,
                Expect::Api(code),
            ));
        }
    }
    // The approval pages: HTML refusals with the same codes.
    for path in [
        "/approvals".to_string(),
        format!("/approvals/{id}"),
        format!("/approvals/{id}?action=approve"),
        "/audit".to_string(),
    ] {
        for (who, from, code) in [
            ("a bot's node", CI, Forbidden),
            ("a user with no role", CAROL, Forbidden),
            ("an unknown node", UNKNOWN, Unauthenticated),
        ] {
            rows.push(row(
                format!("GET {path} by {who}"),
                req(from, "GET", path.clone()),
                Expect::Page(code),
            ));
        }
    }
    // Method confusion and unknown paths, by an admin and by nobody.
    let confusion: Vec<(&'static str, String, ErrorCode)> = vec![
        (
            "GET",
            "/v1/admin/approvals/approve-all".into(),
            MethodNotAllowed,
        ),
        (
            "GET",
            format!("/v1/admin/approvals/{id}/approve"),
            MethodNotAllowed,
        ),
        (
            "GET",
            format!("/v1/admin/approvals/{id}/deny"),
            MethodNotAllowed,
        ),
        ("GET", "/v1/admin/revoke".into(), MethodNotAllowed),
        ("POST", "/v1/admin/approvals".into(), MethodNotAllowed),
        ("DELETE", "/v1/admin/audit".into(), MethodNotAllowed),
        ("PUT", "/v1/admin/policy".into(), MethodNotAllowed),
        (
            "GET",
            "/v1/admin/policy/remembered/rr_0123".into(),
            MethodNotAllowed,
        ),
        ("GET", "/v1/enroll/tokens".into(), MethodNotAllowed),
        ("GET", "/v1/certs/revoke".into(), MethodNotAllowed),
        ("GET", "/v1/admin".into(), NotFound),
        ("GET", "/v1/admin/".into(), NotFound),
        ("GET", "/v1/admin/approvals/".into(), NotFound),
        ("GET", "/V1/ADMIN/APPROVALS".into(), NotFound),
        ("GET", "/v1/admin/users".into(), NotFound),
        ("GET", "/v1/admin/approvals%2F..%2Faudit".into(), NotFound),
        ("POST", "/v1/admin/approve-all".into(), NotFound),
    ];
    for (method, path, code) in confusion {
        // An unknown path or method tells nobody more than it tells an admin.
        for (who, from) in [("an admin", ALICE), ("nobody", UNKNOWN)] {
            let mut r = req(from, method, path.clone());
            if method != "GET" && method != "DELETE" {
                r = r.json(json!({}));
            }
            rows.push(row(
                format!("{method} {path} by {who}"),
                r,
                Expect::Api(code),
            ));
        }
    }
    let n = run_table(&w, rows).await;
    eprintln!("admin routes: {n} rows");
}

// ---------------------------------------------------------------------------------------------
// Policy tricks

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_tricks_neither_widen_nor_bypass_a_deny() {
    let w = world("").await;
    let ask = |repos: &[&str], perms: &[&str]| {
        req(CI, "POST", "/v1/credentials").json(credential_request(repos, perms))
    };
    let read = ["contents:read"];
    use ErrorCode::*;
    let rows = vec![
        row(
            "the denied repository in other case",
            ask(&["ACME-Corp/Infra"], &read),
            Expect::Api(PolicyDenied),
        ),
        row(
            "the denied repository with .git",
            ask(&["acme-corp/infra.git"], &read),
            Expect::Api(PolicyDenied),
        ),
        // Regression: `.GIT` in another case is stripped before the deny is matched.
        row(
            "the denied repository with .GIT in other case",
            ask(&["acme-corp/Infra.GIT"], &read),
            Expect::Api(PolicyDenied),
        ),
        row(
            "the denied repository behind an allowed one's ..",
            ask(&["acme-corp/web/../infra"], &read),
            Expect::Api(InvalidRepository),
        ),
        row(
            "a .. owner",
            ask(&["../infra"], &read),
            Expect::Api(InvalidRepository),
        ),
        row(
            "a unicode look-alike of the denied repository",
            ask(&["acme-corp/\u{456}nfra"], &read),
            Expect::Api(InvalidRepository),
        ),
        row(
            "a full-width solidus",
            ask(&["acme-corp\u{ff0f}infra"], &read),
            Expect::Api(InvalidRepository),
        ),
        row(
            "a URL-encoded slash",
            ask(&["acme-corp%2Finfra"], &read),
            Expect::Api(InvalidRepository),
        ),
        row(
            "a trailing space",
            ask(&["acme-corp/infra "], &read),
            Expect::Api(InvalidRepository),
        ),
        row(
            "a NUL after the denied name",
            ask(&["acme-corp/infra\u{0}x"], &read),
            Expect::Api(InvalidRepository),
        ),
        row(
            "no repositories at all (is not \"every repository\")",
            ask(&[], &read),
            Expect::Api(NoRepositories),
        ),
        row(
            "an allowed and the denied repository together",
            ask(&["acme-corp/web", "acme-corp/infra"], &read),
            Expect::Api(PolicyDenied),
        ),
        row(
            "the denied repository hidden behind a duplicate",
            ask(
                &["acme-corp/web", "acme-corp/web", "ACME-CORP/INFRA"],
                &read,
            ),
            Expect::Api(PolicyDenied),
        ),
        row(
            "a wildcard as the requested repository",
            ask(&["acme-corp/*"], &read),
            Expect::Api(InvalidRepository),
        ),
        row(
            "a wildcard owner",
            ask(&["*/infra"], &read),
            Expect::Api(InvalidRepository),
        ),
        row(
            "a question-mark glob",
            ask(&["acme-corp/infr?"], &read),
            Expect::Api(InvalidRepository),
        ),
        row(
            "permission in other case",
            ask(&["acme-corp/web"], &["Contents:Read"]),
            Expect::Api(UnknownPermission),
        ),
        row(
            "permission with spaces",
            ask(&["acme-corp/web"], &[" contents:read"]),
            Expect::Api(UnknownPermission),
        ),
        row(
            "permission with a space around the colon",
            ask(&["acme-corp/web"], &["contents : read"]),
            Expect::Api(UnknownPermission),
        ),
        row(
            "two permissions in one string",
            ask(&["acme-corp/web"], &["contents:read,contents:write"]),
            Expect::Api(UnknownPermission),
        ),
        row(
            "contents:admin",
            ask(&["acme-corp/web"], &["contents:admin"]),
            Expect::Api(UnknownPermission),
        ),
        row(
            "a wildcard permission",
            ask(&["acme-corp/web"], &["*:write"]),
            Expect::Api(UnknownPermission),
        ),
        row(
            "duplicate permissions on the denied repository",
            ask(&["acme-corp/infra"], &["contents:read", "contents:read"]),
            Expect::Api(PolicyDenied),
        ),
        row(
            "no permissions",
            ask(&["acme-corp/web"], &[]),
            Expect::Api(EmptyPermissions),
        ),
        row(
            "another owner than the one the policy names",
            ask(&["acme-corp/web", "evil-corp/web"], &read),
            Expect::Api(ReposAcrossOwners),
        ),
    ];
    let n = run_table(&w, rows).await;
    // Deduplication is not a refusal: the same read of acme-corp/web asked twice over is one
    // token for one repository with one permission.
    let (s, text) = send(
        &w,
        &ask(
            &["acme-corp/web", "ACME-CORP/WEB.git"],
            &["contents:read", "contents:read"],
        ),
    )
    .await;
    assert_eq!(s, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["repositories"], json!(["acme-corp/web"]), "{text}");
    let info = w
        .github
        .token_info(v["token"].as_str().unwrap())
        .expect("minted by the fake");
    assert_eq!(info.repositories, ["acme-corp/web"]);
    eprintln!("policy tricks: {n} rows");
}

// ---------------------------------------------------------------------------------------------
// CSRF on the approval page

/// The form token the detail page of `id` carries for the admin at `from`.
async fn form_token(w: &World<InProcessBroker>, from: &'static str, id: &str) -> String {
    let (s, html) = send(w, &req(from, "GET", format!("/approvals/{id}"))).await;
    assert_eq!(s, 200, "{html}");
    let start = html.find("name=\"csrf\" value=\"").expect("a form token") + 19;
    html[start..].split('"').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_approval_forms_change_nothing() {
    let w = world("").await;
    let id = pending_request(&w).await;
    let alice_token = form_token(&w, ALICE, &id).await;
    let bob_token = form_token(&w, BOB, &id).await;
    let origin = w.broker.url.clone();
    let approve = |token: &str| {
        req(ALICE, "POST", format!("/approvals/{id}/approve")).raw(
            Some("application/x-www-form-urlencoded"),
            format!("csrf={token}&bot=ci-bot&remember=1"),
        )
    };
    let good = |token: &str| {
        approve(token)
            .header("origin", origin.clone())
            .header("sec-fetch-site", "same-origin")
    };
    use ErrorCode::*;
    let rows = vec![
        row(
            "a foreign Origin",
            approve(&alice_token).header("origin", "http://evil.example"),
            Expect::Page(Forbidden),
        ),
        row(
            "Origin: null",
            approve(&alice_token).header("origin", "null"),
            Expect::Page(Forbidden),
        ),
        row(
            "a cross-site Sec-Fetch-Site without Origin",
            approve(&alice_token).header("sec-fetch-site", "cross-site"),
            Expect::Page(Forbidden),
        ),
        row(
            "a same-site (other subdomain) Sec-Fetch-Site",
            approve(&alice_token)
                .header("origin", origin.clone())
                .header("sec-fetch-site", "same-site"),
            Expect::Page(Forbidden),
        ),
        row(
            "an Origin of the broker's host on another port",
            approve(&alice_token).header("origin", "http://127.0.0.1:1"),
            Expect::Page(Forbidden),
        ),
        row(
            "no form token",
            req(ALICE, "POST", format!("/approvals/{id}/approve"))
                .header("origin", origin.clone())
                .raw(
                    Some("application/x-www-form-urlencoded"),
                    "bot=ci-bot&remember=1",
                ),
            Expect::Page(Forbidden),
        ),
        row("an empty form token", good(""), Expect::Page(Forbidden)),
        row(
            "a forged form token",
            good("v1.1767225600.0000000000000000000000000000000000000000000000000000000000000000"),
            Expect::Page(Forbidden),
        ),
        row(
            "a token from the future",
            good(&{
                let mut parts: Vec<String> = alice_token.split('.').map(str::to_string).collect();
                let t: i64 = parts[1].parse().unwrap();
                parts[1] = (t + 86_400).to_string();
                parts.join(".")
            }),
            Expect::Page(Forbidden),
        ),
        row(
            "another admin's token",
            good(&bob_token),
            Expect::Page(Forbidden),
        ),
        row(
            "a token with its MAC truncated",
            good(&alice_token[..alice_token.len() - 2]),
            Expect::Page(Forbidden),
        ),
        row(
            "a valid token from a non-admin node",
            req(CAROL, "POST", format!("/approvals/{id}/approve"))
                .header("origin", origin.clone())
                .raw(
                    Some("application/x-www-form-urlencoded"),
                    format!("csrf={alice_token}&bot=ci-bot"),
                ),
            Expect::Page(Forbidden),
        ),
        row(
            "a rebound host name",
            good(&alice_token).header("host", "evil.example"),
            Expect::Page(Forbidden),
        ),
        row(
            "a host name that only starts like the broker's address",
            good(&alice_token).header("host", "127.0.0.1.evil.example"),
            Expect::Page(Forbidden),
        ),
        row(
            "a host name that only starts like localhost",
            good(&alice_token).header("host", "localhost.evil.example"),
            Expect::Page(Forbidden),
        ),
        row(
            "a host name that only looks like a MagicDNS name",
            good(&alice_token).header("host", "broker.ts.net.evil.example"),
            Expect::Page(Forbidden),
        ),
        row(
            "a JSON body instead of a form",
            req(ALICE, "POST", format!("/approvals/{id}/approve"))
                .header("origin", origin.clone())
                .json(json!({"csrf": alice_token, "bot": "ci-bot"})),
            Expect::Page(UnsupportedMediaType),
        ),
        row(
            "GET on the approve action",
            req(
                ALICE,
                "GET",
                format!("/approvals/{id}/approve?csrf={alice_token}"),
            ),
            Expect::Api(MethodNotAllowed),
        ),
        row(
            "GET of the page with ?action=approve only shows it",
            req(ALICE, "GET", format!("/approvals/{id}?action=approve")),
            Expect::Status(200),
        ),
        row(
            "a deny with another admin's token",
            req(ALICE, "POST", format!("/approvals/{id}/deny"))
                .header("origin", origin.clone())
                .raw(
                    Some("application/x-www-form-urlencoded"),
                    format!("csrf={bob_token}&bot=ci-bot&reason=x"),
                ),
            Expect::Page(Forbidden),
        ),
    ];
    let n = run_table(&w, rows).await;
    // The same form with alice's own token from the page's origin goes through.
    let (s, text) = send(&w, &good(&alice_token)).await;
    assert_eq!(s, 303, "{text}");
    eprintln!("CSRF: {n} rows");
}

// ---------------------------------------------------------------------------------------------
// Key-provisioner API and Coder

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provisioner_and_coder_refusals_mint_no_key() {
    let w = world("").await;
    // A key the provisioner holds, which nobody else may give back.
    let (s, text) = send(
        &w,
        &req(UNKNOWN, "POST", "/api/v1/keys/service")
            .header("x-provisioner-secret", SECRET)
            .json(json!({"scope": "ci", "name": "held-by-provisioner"})),
    )
    .await;
    assert_eq!(s, 200, "{text}");
    let held = ops_get(&w, "/v1/keys").await["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "held-by-provisioner")
        .and_then(|k| k["credential_id"].as_str())
        .expect("the provisioner's key is listed with its credential_id")
        .to_string();
    let release = |from: &'static str| {
        req(from, "POST", "/v1/credentials/release").json(json!({"credential_id": held}))
    };
    let service = json!({"scope": "ci", "name": "gha-main"});
    let with_secret = |secret: &str| {
        req(UNKNOWN, "POST", "/api/v1/keys/service")
            .header("x-provisioner-secret", secret.to_string())
            .json(service.clone())
    };
    use ErrorCode::*;
    let rows = vec![
        row(
            "no secret",
            req(UNKNOWN, "POST", "/api/v1/keys/service").json(service.clone()),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "an empty secret",
            with_secret(""),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "a wrong secret",
            with_secret("provisioner-secret-attacks-9999999999"),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "the secret's prefix",
            with_secret(&SECRET[..SECRET.len() - 1]),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "the secret and one more byte",
            with_secret(&format!("{SECRET}0")),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "the secret in upper case",
            with_secret(&SECRET.to_uppercase()),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "the secret with an escaped newline (a badly quoted script)",
            with_secret(&format!("{SECRET}\\n")),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "the secret in the query string",
            req(
                UNKNOWN,
                "POST",
                format!("/api/v1/keys/service?secret={SECRET}&x-provisioner-secret={SECRET}"),
            )
            .json(service.clone()),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "the secret as a Bearer token",
            req(UNKNOWN, "POST", "/api/v1/keys/service")
                .header("authorization", format!("Bearer {SECRET}"))
                .json(service.clone()),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "an admin with a wrong secret",
            req(ALICE, "POST", "/api/v1/keys/service")
                .header("x-provisioner-secret", "wrong")
                .json(service.clone()),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "a workspace key with a wrong secret",
            req(UNKNOWN, "POST", "/api/v1/keys/workspace")
                .header("x-provisioner-secret", "wrong")
                .json(json!({"workspace_id": "w1", "workspace_name": "dev",
                    "coder_user": "alice", "coder_user_id": "usr-alice"})),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "a revocation with a wrong secret",
            req(UNKNOWN, "DELETE", "/api/v1/keys/gha-main").header("x-provisioner-secret", "x"),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "a bot's API key revoking the provisioner's key",
            req(UNKNOWN, "DELETE", "/api/v1/keys/held-by-provisioner")
                .header("authorization", format!("Bearer {REVIEW_KEY}")),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "a tagged node revoking the provisioner's key",
            req(CI, "DELETE", "/api/v1/keys/held-by-provisioner"),
            Expect::Seed(InvalidProvisionerSecret),
        ),
        row(
            "an oversized body with the right secret",
            req(UNKNOWN, "POST", "/api/v1/keys/service")
                .header("x-provisioner-secret", SECRET)
                .raw(
                    Some("application/json"),
                    format!(
                        "{{\"scope\": \"ci\", \"name\": \"big\", \"pad\": \"{}\"}}",
                        "x".repeat(70 * 1024)
                    ),
                ),
            Expect::Seed(BodyTooLarge),
        ),
        row(
            "a workspace scope through the service route",
            with_secret(SECRET).json(json!({"scope": "workspace", "name": "sneaky"})),
            Expect::Seed(InvalidScope),
        ),
        row(
            "a workspace field with a control character",
            req(UNKNOWN, "POST", "/api/v1/keys/workspace")
                .header("x-provisioner-secret", SECRET)
                .json(
                    json!({"workspace_id": "w1", "workspace_name": "dev\u{1b}[2J",
                    "coder_user": "alice", "coder_user_id": "usr-alice"}),
                ),
            Expect::Seed(InvalidWorkspace),
        ),
        row(
            "bob's Coder session asking for alice's key",
            req(UNKNOWN, "POST", "/api/v1/keys/user")
                .header("authorization", "Bearer sess-bob-4567")
                .json(json!({"coder_user": "alice"})),
            Expect::Seed(Forbidden),
        ),
        row(
            "bob's Coder session asking for ALICE in other case",
            req(UNKNOWN, "POST", "/api/v1/keys/user")
                .header("authorization", "Bearer sess-bob-4567")
                .json(json!({"coder_user": "ALICE"})),
            Expect::Seed(Forbidden),
        ),
        row(
            "an unknown Coder session token",
            req(UNKNOWN, "POST", "/api/v1/keys/user")
                .header("authorization", "Bearer sess-nobody-0000"),
            Expect::Seed(InvalidSessionToken),
        ),
        row(
            "a Coder session token in Coder's own header is not read",
            req(UNKNOWN, "POST", "/api/v1/keys/user")
                .header("coder-session-token", "sess-alice-0123"),
            Expect::Seed(Unauthenticated),
        ),
        row(
            "a tagged node asking for a user key",
            req(CI, "POST", "/api/v1/keys/user"),
            Expect::Seed(Unauthenticated),
        ),
        row(
            "a bot releases the provisioner's key",
            release(UNKNOWN).header("authorization", format!("Bearer {REVIEW_KEY}")),
            Expect::Api(UnknownCredential),
        ),
        row(
            "a tagged node releases the provisioner's key",
            release(CI),
            Expect::Api(UnknownCredential),
        ),
        row(
            "an unknown node releases the provisioner's key",
            release(UNKNOWN),
            Expect::Api(Unauthenticated),
        ),
        row(
            "an admin user releases the provisioner's key through the holder's route",
            release(ALICE),
            Expect::Api(UnknownCredential),
        ),
        row(
            "a tailnet user asking for another user's key",
            req(CAROL, "POST", "/api/v1/keys/user").json(json!({"coder_user": "alice"})),
            Expect::Seed(Forbidden),
        ),
    ];
    let n = run_table(&w, rows).await;
    // The right secret works: the refusals were about the secret.
    let (s, text) = send(&w, &with_secret(SECRET)).await;
    assert_eq!(s, 200, "{text}");
    eprintln!("provisioner and Coder: {n} rows");
}

// ---------------------------------------------------------------------------------------------
// mTLS enrollment

fn csr(cn: Option<&str>, uris: &[&str]) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    if let Some(cn) = cn {
        dn.push(rcgen::DnType::CommonName, cn);
    }
    p.distinguished_name = dn;
    p.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
        .collect();
    p.serialize_request(&key).unwrap().pem().unwrap()
}

/// A join token from the admin API (`ttl` like `1h`).
async fn join_token(w: &World<InProcessBroker>, bot: &str, ttl: &str) -> (String, String) {
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{}/v1/enroll/tokens", w.broker.url))
        .bearer_auth(OPS_KEY)
        .json(&json!({"bot": bot, "ttl": ttl}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    (
        v["token"].as_str().unwrap().to_string(),
        v["expires_at"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enrollment_attacks_issue_no_certificate() {
    let w = world("").await;
    let enroll = |body: Value| req(UNKNOWN, "POST", "/v1/enroll").json(body);
    let own = || csr(Some("cert-bot"), &["botcreds://bot/cert-bot"]);

    // A token used once, properly.
    let (used, _) = join_token(&w, "cert-bot", "1h").await;
    let (s, text) = send(&w, &enroll(json!({"token": used, "csr": own()}))).await;
    assert_eq!(s, 200, "{text}");
    // A token that has expired: wait for its expiry time (the broker's clock cannot be moved
    // from outside; this is a deadline, not a guess).
    let (expired, expires_at) = join_token(&w, "cert-bot", "1s").await;
    let expires_at =
        time::OffsetDateTime::parse(&expires_at, &time::format_description::well_known::Rfc3339)
            .unwrap();
    while time::OffsetDateTime::now_utc() <= expires_at + time::Duration::seconds(1) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A live token for cert-bot, attacked below and still good afterwards.
    let (live, _) = join_token(&w, "cert-bot", "1h").await;

    let dns_csr = {
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(vec!["broker.example.com".to_string()]).unwrap();
        p.serialize_request(&key).unwrap().pem().unwrap()
    };
    use ErrorCode::*;
    let rows = vec![
        row(
            "a reused join token",
            enroll(json!({"token": used, "csr": own()})),
            Expect::Api(InvalidJoinToken),
        ),
        row(
            "an expired join token",
            enroll(json!({"token": expired, "csr": own()})),
            Expect::Api(InvalidJoinToken),
        ),
        row(
            "cert-bot's token naming another bot",
            enroll(json!({"token": live, "bot": "ops",
                "csr": csr(Some("ops"), &["botcreds://bot/ops"])})),
            Expect::Api(InvalidJoinToken),
        ),
        row(
            "cert-bot's token naming a bot that does not exist",
            enroll(json!({"token": live, "bot": "ghost",
                "csr": csr(Some("ghost"), &[])})),
            Expect::Api(InvalidJoinToken),
        ),
        row(
            "a CSR whose common name is another bot",
            enroll(json!({"token": live, "csr": csr(Some("ops"), &[])})),
            Expect::Api(InvalidCsr),
        ),
        row(
            "a CSR whose URI names another bot",
            enroll(json!({"token": live, "csr": csr(None, &["botcreds://bot/ops"])})),
            Expect::Api(InvalidCsr),
        ),
        row(
            "a CSR asking for the admin role",
            enroll(json!({"token": live,
                "csr": csr(Some("cert-bot"), &["botcreds://bot/cert-bot", "botcreds://role/admin"])})),
            Expect::Api(InvalidCsr),
        ),
        row(
            "a CSR with a DNS name",
            enroll(json!({"token": live, "csr": dns_csr})),
            Expect::Api(InvalidCsr),
        ),
        row(
            "a garbage CSR",
            enroll(
                json!({"token": live, "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"}),
            ),
            Expect::Api(InvalidCsr),
        ),
        row(
            "an unknown join token",
            enroll(json!({"token": "bcj_0123456789abcdef0123456789abcdef", "csr": own()})),
            Expect::Api(InvalidJoinToken),
        ),
        row(
            "no token from an unknown address",
            enroll(json!({"bot": "cert-bot", "csr": own()})),
            Expect::Api(InvalidJoinToken),
        ),
        row(
            "an unknown field (asking for admin)",
            enroll(json!({"token": live, "csr": own(), "admin": true})),
            Expect::Api(InvalidRequest),
        ),
        row(
            "a tailnet bot without a token naming the certificate-only bot",
            req(CI, "POST", "/v1/enroll").json(json!({"bot": "cert-bot",
                "csr": own()})),
            Expect::Api(InvalidJoinToken),
        ),
        row(
            "a tailnet user the policy maps to no bot, without a token",
            req(CAROL, "POST", "/v1/enroll").json(json!({"csr": own()})),
            Expect::Api(Forbidden),
        ),
        row(
            "an API-key bot without a token",
            enroll(json!({"bot": "cert-bot", "csr": own()}))
                .header("authorization", format!("Bearer {REVIEW_KEY}")),
            Expect::Api(InvalidJoinToken),
        ),
        row(
            "renewal without a client certificate",
            req(UNKNOWN, "POST", "/v1/enroll/renew").json(json!({"csr": own()})),
            Expect::Api(Unauthenticated),
        ),
    ];
    let n = run_table(&w, rows).await;
    // None of the refusals used up the live token.
    let (s, text) = send(&w, &enroll(json!({"token": live, "csr": own()}))).await;
    assert_eq!(
        s, 200,
        "the attacked token still enrolls its own bot: {text}"
    );
    eprintln!("mTLS enrollment: {n} rows");
}
