//! Tests of the real client against a scripted GitHub on 127.0.0.1 that answers with the
//! reference fixtures and records every request it gets.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use botcreds_proto::{ErrorCode, Permission, RepoName};
use bytes::Bytes;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use super::*;
use crate::clock::{Clock, OffsetClock};

const PKCS1: &str = include_str!("../../../../tests/fixtures/github/test-app-key.pem");
const PKCS8: &str = include_str!("../../../../tests/fixtures/github/test-app-key.pkcs8.pem");
const PUBLIC: &str = include_str!("../../../../tests/fixtures/github/test-app-key.pub.pem");
const INSTALLATION: &str = include_str!("../../../../tests/fixtures/github/installation.json");
const INSTALLATIONS: &str =
    include_str!("../../../../tests/fixtures/github/installations-list.json");
const ACCESS_TOKEN: &str = include_str!("../../../../tests/fixtures/github/access-token.json");
const ACCESS_TOKEN_ALL: &str =
    include_str!("../../../../tests/fixtures/github/access-token-all-repos.json");
const E401_JWT: &str = include_str!("../../../../tests/fixtures/github/error-401-bad-jwt.json");
const E401_CREDS: &str =
    include_str!("../../../../tests/fixtures/github/error-401-bad-credentials.json");
const E403: &str = include_str!("../../../../tests/fixtures/github/error-403-not-accessible.json");
const E403_RATE: &str =
    include_str!("../../../../tests/fixtures/github/error-403-rate-limited.json");
const E404: &str = include_str!("../../../../tests/fixtures/github/error-404-not-installed.json");
const E422_PERMS: &str =
    include_str!("../../../../tests/fixtures/github/error-422-permissions.json");
const E422_REPOS: &str =
    include_str!("../../../../tests/fixtures/github/error-422-repositories.json");

const APP_ID: u64 = 912345;
const INSTALL_PATH: &str = "/repos/acme-corp/web/installation";
const MINT_PATH: &str = "/app/installations/51234567/access_tokens";
const FIXTURE_TOKEN: &str = "ghs_HgiKXSjjarvO0oeFGPRMbw60yPcKiRvgq1GZ";

// ---- the scripted GitHub -------------------------------------------------------------

#[derive(Clone)]
struct Canned {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Canned {
    fn json(status: u16, body: &str) -> Canned {
        Canned {
            status,
            headers: vec![(
                "content-type".into(),
                "application/json; charset=utf-8".into(),
            )],
            body: body.to_string(),
        }
    }

    fn empty(status: u16) -> Canned {
        Canned {
            status,
            headers: Vec::new(),
            body: String::new(),
        }
    }

    fn header(mut self, name: &str, value: impl ToString) -> Canned {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
}

struct Seen {
    method: String,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct World {
    /// (method, path) → answers in order; the last one repeats.
    routes: HashMap<(String, String), VecDeque<Canned>>,
    log: Vec<Seen>,
}

struct FakeGithub {
    addr: SocketAddr,
    world: Arc<Mutex<World>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    State(world): State<Arc<Mutex<World>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut w = world.lock().unwrap();
    let key = (method.to_string(), uri.path().to_string());
    w.log.push(Seen {
        method: key.0.clone(),
        path: key.1.clone(),
        headers,
        body,
    });
    let canned = match w.routes.get_mut(&key) {
        Some(q) if q.len() > 1 => q.pop_front().unwrap(),
        Some(q) if !q.is_empty() => q[0].clone(),
        _ => Canned::json(404, E404),
    };
    let mut r = Response::builder().status(canned.status);
    for (k, v) in &canned.headers {
        r = r.header(k, v);
    }
    r.body(Body::from(canned.body)).unwrap()
}

impl FakeGithub {
    async fn start() -> FakeGithub {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let world = Arc::new(Mutex::new(World::default()));
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(world.clone());
        // Bound before the client exists, so connections queue until the server accepts.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeGithub { addr, world, task }
    }

    /// Answer `method path` with these, in order (the last one repeats).
    fn set(&self, method: &str, path: &str, answers: Vec<Canned>) {
        let mut w = self.world.lock().unwrap();
        w.routes
            .insert((method.to_string(), path.to_string()), answers.into());
    }

    /// The usual world: `acme-corp/web` installed (fixture), minting answers the fixture token.
    fn installed(&self) {
        self.set("GET", INSTALL_PATH, vec![Canned::json(200, INSTALLATION)]);
        self.set(
            "POST",
            MINT_PATH,
            vec![
                Canned::json(201, ACCESS_TOKEN)
                    .header("x-ratelimit-limit", 5000)
                    .header("x-ratelimit-remaining", 4987),
            ],
        );
    }

    fn count(&self, method: &str, path: &str) -> usize {
        let w = self.world.lock().unwrap();
        w.log
            .iter()
            .filter(|s| s.method == method && s.path == path)
            .count()
    }

    fn total(&self) -> usize {
        self.world.lock().unwrap().log.len()
    }

    fn last<T>(&self, method: &str, path: &str, f: impl FnOnce(&Seen) -> T) -> T {
        let w = self.world.lock().unwrap();
        let seen = w
            .log
            .iter()
            .rev()
            .find(|s| s.method == method && s.path == path)
            .unwrap_or_else(|| panic!("no {method} {path} seen"));
        f(seen)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

// ---- helpers -------------------------------------------------------------------------

fn config(api_url: &str, key: &str) -> GithubAppConfig {
    GithubAppConfig {
        app_id: APP_ID,
        private_key_pem: Secret::new(key),
        api_url: api_url.to_string(),
        app_slug: None,
        bot_user_id: None,
        request_timeout: Duration::from_secs(10),
    }
}

fn client_with(config: GithubAppConfig) -> (GithubClient, OffsetClock) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let clock = OffsetClock::default();
    let c = GithubClient::new(config, Arc::new(clock.clone()))
        .unwrap()
        .with_retry_backoff(Duration::from_millis(1));
    (c, clock)
}

fn client(fake: &FakeGithub) -> (GithubClient, OffsetClock) {
    client_with(config(&fake.url(), PKCS1))
}

fn repos(names: &[&str]) -> Vec<RepoName> {
    names.iter().map(|n| n.parse().unwrap()).collect()
}

fn perms(names: &[&str]) -> Vec<Permission> {
    names.iter().map(|n| n.parse().unwrap()).collect()
}

async fn mint_web(c: &GithubClient) -> Result<InstallationToken, GithubError> {
    c.create_installation_token(
        "acme-corp",
        &repos(&["acme-corp/web"]),
        &perms(&["contents:read"]),
    )
    .await
}

/// Verify a `Bearer` JWT with the fixture public key; its header and claims.
fn verified_jwt(authorization: &str) -> (jsonwebtoken::Header, Value) {
    let jwt = authorization
        .strip_prefix("Bearer ")
        .expect("Bearer scheme");
    let key = DecodingKey::from_rsa_pem(PUBLIC.as_bytes()).unwrap();
    let mut v = Validation::new(Algorithm::RS256);
    v.required_spec_claims = ["exp".to_string(), "iat".to_string()].into();
    let data =
        jsonwebtoken::decode::<Value>(jwt, &key, &v).expect("JWT verifies with the public key");
    (data.header, data.claims)
}

fn installation_with(id: u64, suspended: bool) -> String {
    let src = if suspended {
        serde_json::from_str::<Vec<Value>>(INSTALLATIONS).unwrap()[1].clone()
    } else {
        serde_json::from_str::<Value>(INSTALLATION).unwrap()
    };
    let mut v = src;
    v["id"] = json!(id);
    v.to_string()
}

// ---- JWT and headers -----------------------------------------------------------------

#[tokio::test]
async fn app_calls_carry_a_verifiable_jwt_and_githubs_headers() {
    for key in [PKCS1, PKCS8] {
        let fake = FakeGithub::start().await;
        fake.set(
            "GET",
            "/app",
            vec![Canned::json(
                200,
                r#"{"id":912345,"slug":"acme-credbroker","name":"Acme"}"#,
            )],
        );
        fake.set(
            "GET",
            "/users/acme-credbroker%5Bbot%5D",
            vec![Canned::json(
                200,
                r#"{"login":"acme-credbroker[bot]","id":41898282,"type":"Bot"}"#,
            )],
        );
        let (c, clock) = client_with(config(&fake.url(), key));
        let before = clock.now().unix_timestamp();
        let identity = c.app_identity().await.unwrap();
        let after = clock.now().unix_timestamp();
        assert_eq!(
            identity,
            AppIdentity {
                slug: "acme-credbroker".into(),
                bot_user_id: Some(41898282)
            }
        );
        assert_eq!(identity.bot_login(), "acme-credbroker[bot]");
        assert_eq!(
            identity.noreply_email(),
            "41898282+acme-credbroker[bot]@users.noreply.github.com"
        );

        fake.last("GET", "/app", |s| {
            assert_eq!(s.header("accept"), Some("application/vnd.github+json"));
            assert_eq!(s.header("x-github-api-version"), Some("2022-11-28"));
            assert_eq!(
                s.header("user-agent"),
                Some(concat!("botcreds/", env!("CARGO_PKG_VERSION")))
            );
            let (header, claims) = verified_jwt(s.header("authorization").unwrap());
            assert_eq!(header.alg, Algorithm::RS256);
            assert_eq!(header.typ.as_deref(), Some("JWT"));
            assert_eq!(
                claims["iss"],
                json!(APP_ID),
                "iss is the app id as a JSON number"
            );
            let iat = claims["iat"].as_i64().unwrap();
            let exp = claims["exp"].as_i64().unwrap();
            assert!((before - 60..=after - 60).contains(&iat), "iat = now - 60");
            assert_eq!(exp - iat, 600, "exp = now + 540");
        });
        fake.last("GET", "/users/acme-credbroker%5Bbot%5D", |s| {
            assert_eq!(
                s.header("authorization"),
                None,
                "the user lookup needs no credentials"
            );
            assert_eq!(s.header("accept"), Some("application/vnd.github+json"));
        });

        // Cached: a second call asks GitHub nothing.
        let calls = fake.total();
        assert_eq!(c.app_identity().await.unwrap(), identity);
        assert_eq!(fake.total(), calls);
    }
}

#[tokio::test]
async fn the_jwt_is_reused_until_its_last_minute() {
    let fake = FakeGithub::start().await;
    fake.installed();
    let (c, clock) = client(&fake);
    let auth = |fake: &FakeGithub| {
        fake.last("POST", MINT_PATH, |s| {
            s.header("authorization").unwrap().to_string()
        })
    };

    mint_web(&c).await.unwrap();
    let first = auth(&fake);
    assert_eq!(
        fake.last("GET", INSTALL_PATH, |s| s
            .header("authorization")
            .unwrap()
            .to_string()),
        first,
        "the installation lookup uses the same JWT"
    );
    clock.advance(300);
    mint_web(&c).await.unwrap();
    assert_eq!(auth(&fake), first);
    clock.advance(200); // 40 s of life left
    mint_web(&c).await.unwrap();
    let renewed = auth(&fake);
    assert_ne!(renewed, first);
    verified_jwt(&renewed);
}

#[tokio::test]
async fn identity_from_config_asks_github_nothing() {
    let fake = FakeGithub::start().await;
    let mut cfg = config(&fake.url(), PKCS8);
    cfg.app_slug = Some("acme-credbroker".into());
    cfg.bot_user_id = Some(41898282);
    let (c, _) = client_with(cfg);
    let id = c.app_identity().await.unwrap();
    assert_eq!(
        (id.slug.as_str(), id.bot_user_id),
        ("acme-credbroker", Some(41898282))
    );
    assert_eq!(fake.total(), 0);
}

#[tokio::test]
async fn a_failed_bot_lookup_leaves_the_id_out_and_is_retried_later() {
    let fake = FakeGithub::start().await;
    let user = "/users/acme-credbroker%5Bbot%5D";
    fake.set("GET", user, vec![Canned::json(404, E404)]);
    let mut cfg = config(&fake.url(), PKCS1);
    cfg.app_slug = Some("acme-credbroker".into());
    let (c, clock) = client_with(cfg);

    let id = c.app_identity().await.unwrap();
    assert_eq!(id.bot_user_id, None);
    assert_eq!(
        id.noreply_email(),
        "acme-credbroker[bot]@users.noreply.github.com"
    );
    c.app_identity().await.unwrap();
    assert_eq!(fake.count("GET", user), 1, "not asked again at once");
    assert_eq!(fake.count("GET", "/app"), 0, "slug from config");

    fake.set(
        "GET",
        user,
        vec![Canned::json(
            200,
            r#"{"login":"acme-credbroker[bot]","id":7}"#,
        )],
    );
    clock.advance(601);
    assert_eq!(c.app_identity().await.unwrap().bot_user_id, Some(7));
    assert_eq!(fake.count("GET", user), 2);
}

#[tokio::test]
async fn app_lookup_failure_is_an_error() {
    let fake = FakeGithub::start().await;
    fake.set("GET", "/app", vec![Canned::json(401, E401_JWT)]);
    let (c, _) = client(&fake);
    let e = c.app_identity().await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::GithubAuthFailed, "{e}");
    assert!(
        e.to_string()
            .contains("A JSON web token could not be decoded")
    );
}

// ---- minting -------------------------------------------------------------------------

#[tokio::test]
async fn mint_sends_names_and_permission_levels_and_reads_the_token() {
    let fake = FakeGithub::start().await;
    fake.installed();
    let (c, _) = client(&fake);
    let t = c
        .create_installation_token(
            "Acme-Corp",
            &repos(&["acme-corp/web", "acme-corp/api", "acme-corp/web"]),
            &perms(&["contents:read", "pull_requests:write", "contents:write"]),
        )
        .await
        .unwrap();

    fake.last("POST", MINT_PATH, |s| {
        assert_eq!(s.header("content-type"), Some("application/json"));
        assert_eq!(s.header("accept"), Some("application/vnd.github+json"));
        let body: Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(
            body,
            json!({
                "repositories": ["api", "web"],
                "permissions": {"contents": "write", "pull_requests": "write"}
            })
        );
    });
    assert_eq!(
        fake.count("GET", INSTALL_PATH),
        1,
        "looked up by the first repository"
    );

    assert_eq!(t.token.expose(), FIXTURE_TOKEN);
    assert_eq!(
        t.expires_at,
        time::macros::datetime!(2026-08-22 13:04:05 UTC)
    );
    assert_eq!(t.installation_id, 51234567);
    assert_eq!(t.repositories, ["acme-corp/web"]);
    let granted: Vec<(&str, &str)> = t
        .permissions
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        granted,
        [
            ("contents", "read"),
            ("metadata", "read"),
            ("pull_requests", "write")
        ]
    );

    let stats = c.stats();
    assert_eq!(stats.mints, 1);
    assert_eq!((stats.calls_ok, stats.calls_failed), (2, 0));
    assert_eq!(stats.rate_limit_remaining, Some(4987));
    assert_eq!(stats.rate_limit_limit, Some(5000));
}

#[tokio::test]
async fn a_token_answer_without_repositories_falls_back_to_the_request() {
    let fake = FakeGithub::start().await;
    fake.installed();
    fake.set("POST", MINT_PATH, vec![Canned::json(201, ACCESS_TOKEN_ALL)]);
    let (c, _) = client(&fake);
    let t = mint_web(&c).await.unwrap();
    assert_eq!(t.repositories, ["acme-corp/web"]);
    assert_eq!(
        t.permissions.get("administration").map(String::as_str),
        Some("write")
    );
}

#[tokio::test]
async fn requests_that_would_widen_a_token_never_reach_github() {
    let fake = FakeGithub::start().await;
    fake.installed();
    let (c, _) = client(&fake);
    let many: Vec<String> = (0..501).map(|i| format!("acme-corp/r{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let cases = [
        (repos(&[]), perms(&["contents:read"]), "no repository"),
        (repos(&["acme-corp/web"]), perms(&[]), "no permission"),
        (
            repos(&["acme-corp/web", "other/web"]),
            perms(&["contents:read"]),
            "does not belong",
        ),
        (repos(&many), perms(&["contents:read"]), "at most 500"),
    ];
    for (r, p, want) in cases {
        let e = c
            .create_installation_token("acme-corp", &r, &p)
            .await
            .unwrap_err();
        assert!(matches!(e, GithubError::ScopeRejected { .. }), "{e:?}");
        assert!(e.to_string().contains(want), "{want:?} not in {e}");
    }
    assert_eq!(fake.total(), 0);
}

#[tokio::test]
async fn long_form_tokens_are_accepted() {
    let fake = FakeGithub::start().await;
    fake.installed();
    let long = format!("ghs_912345_{}", "eyJhbGciOiJSUzI1NiJ9.x-y_z".repeat(40));
    let body =
        json!({"token": long, "expires_at": "2026-08-22T13:04:05Z", "future_field": {"a": 1}});
    fake.set(
        "POST",
        MINT_PATH,
        vec![Canned::json(201, &body.to_string())],
    );
    let (c, _) = client(&fake);
    let t = mint_web(&c).await.unwrap();
    assert_eq!(t.token.expose(), long);
    assert_eq!(
        t.permissions.get("contents").map(String::as_str),
        Some("read"),
        "from the request"
    );
}

#[tokio::test]
async fn bad_token_answers_are_invalid_and_never_quote_the_body() {
    let secretish = "gho_ThisMustNeverBeQuotedInAnError0123456";
    let cases = [
        json!({"token": secretish, "expires_at": "2026-08-22T13:04:05Z"}).to_string(),
        json!({"token": "ghs_", "expires_at": "2026-08-22T13:04:05Z"}).to_string(),
        json!({"token": "ghs_has space", "expires_at": "2026-08-22T13:04:05Z"}).to_string(),
        json!({"token": FIXTURE_TOKEN}).to_string(),
        json!({"token": FIXTURE_TOKEN, "expires_at": "tomorrow"}).to_string(),
        json!({"expires_at": "2026-08-22T13:04:05Z"}).to_string(),
        format!(r#"{{"token": "{FIXTURE_TOKEN}", "expires_at": "#),
    ];
    for body in cases {
        let fake = FakeGithub::start().await;
        fake.installed();
        fake.set("POST", MINT_PATH, vec![Canned::json(201, &body)]);
        let (c, _) = client(&fake);
        let e = mint_web(&c).await.unwrap_err();
        assert!(
            matches!(e, GithubError::InvalidResponse { .. }),
            "{body}: {e:?}"
        );
        assert_eq!(e.code(), ErrorCode::UpstreamError);
        let text = format!("{e} {e:?}");
        assert!(
            !text.contains(secretish) && !text.contains(FIXTURE_TOKEN),
            "{text}"
        );
        assert_eq!(c.stats().mints, 0);
    }
}

#[tokio::test]
async fn an_oversized_answer_is_refused() {
    let fake = FakeGithub::start().await;
    fake.installed();
    let huge = format!(
        r#"{{"token":"{FIXTURE_TOKEN}","pad":"{}"}}"#,
        "x".repeat(1024 * 1024 + 10)
    );
    fake.set("POST", MINT_PATH, vec![Canned::json(201, &huge)]);
    let (c, _) = client(&fake);
    let e = mint_web(&c).await.unwrap_err();
    assert!(matches!(e, GithubError::InvalidResponse { .. }), "{e:?}");
    assert!(e.to_string().contains("larger than 1024 KiB"));
}

// ---- error mapping and retries -------------------------------------------------------

#[tokio::test]
async fn mint_errors_map_by_status_and_4xx_is_never_retried() {
    let reset_in =
        |secs: i64| (time::OffsetDateTime::now_utc().unix_timestamp() + secs).to_string();
    type Check = fn(&GithubError) -> bool;
    let cases: Vec<(Canned, Check)> = vec![
        (Canned::json(422, E422_PERMS), |e| {
            *e == GithubError::ScopeRejected {
                message: "The permissions requested are not granted to this installation.".into(),
            }
        }),
        (Canned::json(422, E422_REPOS), |e| {
            matches!(e, GithubError::ScopeRejected { message }
                    if message.starts_with("There is at least one repository"))
        }),
        (Canned::json(401, E401_JWT), |e| {
            matches!(e, GithubError::AuthFailed { message }
                    if message == "A JSON web token could not be decoded")
        }),
        (
            Canned::json(403, E403_RATE)
                .header("x-ratelimit-remaining", 0)
                .header("x-ratelimit-limit", 5000)
                .header("x-ratelimit-reset", reset_in(120)),
            |e| {
                matches!(e, GithubError::RateLimited { retry_after_secs }
                    if (100..=120).contains(retry_after_secs))
            },
        ),
        (
            Canned::json(429, E403_RATE).header("retry-after", 30),
            |e| {
                *e == GithubError::RateLimited {
                    retry_after_secs: 30,
                }
            },
        ),
        (
            Canned::json(403, E403_RATE).header("x-ratelimit-remaining", 0),
            |e| {
                *e == GithubError::RateLimited {
                    retry_after_secs: 60,
                }
            },
        ),
        (Canned::json(403, E403), |e| {
            matches!(e, GithubError::Upstream { status: 403, message }
                    if message == "Resource not accessible by integration")
        }),
        (Canned::json(404, E404), |e| {
            *e == GithubError::NotInstalled {
                owner: "acme-corp".into(),
            }
        }),
        (Canned::json(410, r#"{"message":"Gone"}"#), |e| {
            matches!(e, GithubError::Upstream { status: 410, .. })
        }),
    ];
    for (canned, check) in cases {
        let status = canned.status;
        let fake = FakeGithub::start().await;
        fake.installed();
        fake.set("POST", MINT_PATH, vec![canned]);
        let (c, _) = client(&fake);
        let e = mint_web(&c).await.unwrap_err();
        assert!(check(&e), "{status}: {e:?}");
        assert_eq!(fake.count("POST", MINT_PATH), 1, "{status} was retried");
        assert_eq!(c.stats().calls_failed, 1);
    }
}

#[tokio::test]
async fn rate_limits_report_the_code_and_headroom() {
    let fake = FakeGithub::start().await;
    fake.installed();
    fake.set(
        "POST",
        MINT_PATH,
        vec![
            Canned::json(429, E403_RATE)
                .header("retry-after", 45)
                .header("x-ratelimit-remaining", 0)
                .header("x-ratelimit-limit", 5000),
        ],
    );
    let (c, _) = client(&fake);
    let e = mint_web(&c).await.unwrap_err();
    assert_eq!(
        e,
        GithubError::RateLimited {
            retry_after_secs: 45
        }
    );
    assert_eq!(e.code(), ErrorCode::GithubRateLimited);
    assert_eq!(c.stats().rate_limit_remaining, Some(0));
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let fake = FakeGithub::start().await;
    fake.installed();
    fake.set(
        "POST",
        MINT_PATH,
        vec![
            Canned::json(502, r#"{"message":"Server Error"}"#),
            Canned::empty(503),
            Canned::json(201, ACCESS_TOKEN),
        ],
    );
    let (c, _) = client(&fake);
    let t = mint_web(&c).await.unwrap();
    assert_eq!(t.token.expose(), FIXTURE_TOKEN);
    assert_eq!(fake.count("POST", MINT_PATH), 3);
    let stats = c.stats();
    assert_eq!((stats.calls_ok, stats.calls_failed, stats.mints), (2, 2, 1));
}

#[tokio::test]
async fn persistent_server_errors_give_up_after_three_attempts() {
    let fake = FakeGithub::start().await;
    fake.installed();
    fake.set(
        "POST",
        MINT_PATH,
        vec![Canned::json(500, r#"{"message":"Server Error"}"#)],
    );
    let (c, _) = client(&fake);
    let e = mint_web(&c).await.unwrap_err();
    assert_eq!(
        e,
        GithubError::Upstream {
            status: 500,
            message: "Server Error".into()
        }
    );
    assert_eq!(fake.count("POST", MINT_PATH), 3);
}

#[tokio::test]
async fn an_unreachable_github_is_unavailable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let (c, _) = client_with(config(&format!("http://{addr}"), PKCS1));
    let e = mint_web(&c).await.unwrap_err();
    assert!(matches!(e, GithubError::Unavailable { .. }), "{e:?}");
    assert_eq!(e.code(), ErrorCode::UpstreamUnavailable);
    assert_eq!(c.stats().calls_failed, 3, "three attempts");
}

// ---- installations -------------------------------------------------------------------

#[tokio::test]
async fn the_installation_is_cached_per_owner_for_ten_minutes() {
    let fake = FakeGithub::start().await;
    fake.installed();
    fake.set(
        "GET",
        "/repos/acme-corp/api/installation",
        vec![Canned::json(200, INSTALLATION)],
    );
    let (c, clock) = client(&fake);
    mint_web(&c).await.unwrap();
    c.create_installation_token(
        "ACME-CORP",
        &repos(&["acme-corp/api"]),
        &perms(&["issues:read"]),
    )
    .await
    .unwrap();
    assert_eq!(fake.count("GET", INSTALL_PATH), 1);
    assert_eq!(fake.count("GET", "/repos/acme-corp/api/installation"), 0);
    assert_eq!(fake.count("POST", MINT_PATH), 2);

    clock.advance(601);
    mint_web(&c).await.unwrap();
    assert_eq!(
        fake.count("GET", INSTALL_PATH),
        2,
        "looked up again after ten minutes"
    );
}

#[tokio::test]
async fn a_stale_cached_installation_is_looked_up_once_more() {
    let fake = FakeGithub::start().await;
    fake.installed();
    let (c, _) = client(&fake);
    assert_eq!(mint_web(&c).await.unwrap().installation_id, 51234567);

    // Re-installed under a new id: the remembered one now answers 404.
    fake.set(
        "GET",
        INSTALL_PATH,
        vec![Canned::json(200, &installation_with(51299999, false))],
    );
    fake.set("POST", MINT_PATH, vec![Canned::json(404, E404)]);
    let new_mint = "/app/installations/51299999/access_tokens";
    fake.set("POST", new_mint, vec![Canned::json(201, ACCESS_TOKEN)]);
    let t = mint_web(&c).await.unwrap();
    assert_eq!(t.installation_id, 51299999);
    assert_eq!(fake.count("GET", INSTALL_PATH), 2);
    assert_eq!(fake.count("POST", new_mint), 1);

    // Uninstalled: the fresh lookup says so, and nothing is retried beyond it.
    fake.set("POST", new_mint, vec![Canned::json(404, E404)]);
    fake.set("GET", INSTALL_PATH, vec![Canned::json(404, E404)]);
    let e = mint_web(&c).await.unwrap_err();
    assert_eq!(
        e,
        GithubError::NotInstalled {
            owner: "acme-corp".into()
        }
    );
    assert_eq!(fake.count("GET", INSTALL_PATH), 3);
}

#[tokio::test]
async fn a_missing_installation_is_not_installed() {
    let fake = FakeGithub::start().await;
    fake.set("GET", INSTALL_PATH, vec![Canned::json(404, E404)]);
    let (c, _) = client(&fake);
    let e = mint_web(&c).await.unwrap_err();
    assert_eq!(
        e,
        GithubError::NotInstalled {
            owner: "acme-corp".into()
        }
    );
    assert_eq!(e.code(), ErrorCode::GithubNotInstalled);
    assert_eq!(fake.count("POST", MINT_PATH), 0);
}

#[tokio::test]
async fn a_suspended_installation_mints_nothing() {
    let fake = FakeGithub::start().await;
    fake.set(
        "GET",
        INSTALL_PATH,
        vec![Canned::json(200, &installation_with(51234567, true))],
    );
    let (c, _) = client(&fake);
    let e = mint_web(&c).await.unwrap_err();
    assert_eq!(
        e,
        GithubError::Suspended {
            owner: "acme-corp".into()
        }
    );
    assert_eq!(e.code(), ErrorCode::GithubNotInstalled);
    assert_eq!(fake.count("POST", MINT_PATH), 0);
}

#[tokio::test]
async fn suspension_after_caching_is_noticed() {
    let fake = FakeGithub::start().await;
    fake.installed();
    let (c, _) = client(&fake);
    mint_web(&c).await.unwrap();
    fake.set(
        "GET",
        INSTALL_PATH,
        vec![Canned::json(200, &installation_with(51234567, true))],
    );
    fake.set(
        "POST",
        MINT_PATH,
        vec![Canned::json(
            403,
            r#"{"message":"This installation has been suspended"}"#,
        )],
    );
    let e = mint_web(&c).await.unwrap_err();
    assert_eq!(
        e,
        GithubError::Suspended {
            owner: "acme-corp".into()
        }
    );
}

#[tokio::test]
async fn a_moved_repository_is_reported_not_followed() {
    let fake = FakeGithub::start().await;
    fake.set(
        "GET",
        INSTALL_PATH,
        vec![
            Canned::json(301, r#"{"message":"Moved Permanently","url":"x"}"#)
                .header("location", "/elsewhere"),
        ],
    );
    let (c, _) = client(&fake);
    let e = mint_web(&c).await.unwrap_err();
    assert!(
        matches!(e, GithubError::Upstream { status: 301, .. }),
        "{e:?}"
    );
    assert_eq!(fake.count("GET", "/elsewhere"), 0);
}

// ---- revocation ----------------------------------------------------------------------

#[tokio::test]
async fn revoke_presents_the_token_and_treats_401_as_done() {
    let fake = FakeGithub::start().await;
    let (c, _) = client(&fake);
    let token = Secret::new(FIXTURE_TOKEN);
    let path = "/installation/token";

    fake.set("DELETE", path, vec![Canned::empty(204)]);
    c.revoke_installation_token(&token).await.unwrap();
    fake.last("DELETE", path, |s| {
        assert_eq!(
            s.header("authorization"),
            Some(&*format!("Bearer {FIXTURE_TOKEN}"))
        );
        assert_eq!(s.header("x-github-api-version"), Some("2022-11-28"));
        assert!(s.body.is_empty());
    });

    fake.set("DELETE", path, vec![Canned::json(401, E401_CREDS)]);
    c.revoke_installation_token(&token).await.unwrap();

    fake.set("DELETE", path, vec![Canned::json(403, E403)]);
    let e = c.revoke_installation_token(&token).await.unwrap_err();
    assert!(
        matches!(e, GithubError::Upstream { status: 403, .. }),
        "{e:?}"
    );

    fake.set("DELETE", path, vec![Canned::empty(503), Canned::empty(204)]);
    c.revoke_installation_token(&token).await.unwrap();
    assert_eq!(fake.count("DELETE", path), 5);
}

// ---- deploy keys (reference §4.5) ----------------------------------------------------

#[tokio::test]
async fn deploy_keys_are_added_with_read_only_always_sent_and_refusals_mapped() {
    let fake = FakeGithub::start().await;
    let (c, _) = client(&fake);
    let token = Secret::new(FIXTURE_TOKEN);
    let repo: RepoName = "acme-corp/web".parse().unwrap();
    let path = "/repos/acme-corp/web/keys";
    let line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl c";
    fake.set(
        "POST",
        path,
        vec![Canned::json(
            201,
            r#"{"id": 1234, "key": "ssh-ed25519 AAAA", "url": "u", "title": "t", "verified": true,
                "created_at": "2026-01-01T00:00:00Z", "read_only": true, "added_by": null,
                "last_used": null, "enabled": true}"#,
        )],
    );
    assert_eq!(
        c.add_deploy_key(&token, &repo, "botcreds ci dk_1", line, true)
            .await
            .unwrap(),
        1234
    );
    fake.last("POST", path, |s| {
        assert_eq!(
            s.header("authorization"),
            Some(&*format!("Bearer {FIXTURE_TOKEN}"))
        );
        let body: Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(
            body,
            json!({"title": "botcreds ci dk_1", "key": line, "read_only": true})
        );
    });
    c.add_deploy_key(&token, &repo, "t", line, false)
        .await
        .unwrap();
    fake.last("POST", path, |s| {
        let body: Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(
            body["read_only"],
            json!(false),
            "read_only false is sent too"
        );
    });

    let in_use = r#"{"message":"Validation Failed","errors":[{"resource":"PublicKey","code":"custom","field":"key","message":"key is already in use"}],"documentation_url":"d","status":"422"}"#;
    fake.set("POST", path, vec![Canned::json(422, in_use)]);
    let e = c
        .add_deploy_key(&token, &repo, "t", line, true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::DeployKeyRejected);
    assert!(e.to_string().contains("key is already in use"), "{e}");

    fake.set("POST", path, vec![Canned::json(403, E403)]);
    let e = c
        .add_deploy_key(&token, &repo, "t", line, true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::DeployKeyRejected);
    assert!(e.to_string().contains("administration:write"), "{e}");

    fake.set("POST", path, vec![Canned::json(404, E404)]);
    let e = c
        .add_deploy_key(&token, &repo, "t", line, true)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::GithubNotInstalled);
    assert!(!e.to_string().contains(FIXTURE_TOKEN));
}

#[tokio::test]
async fn deploy_key_delete_treats_404_as_gone_and_retries_5xx() {
    let fake = FakeGithub::start().await;
    let (c, _) = client(&fake);
    let token = Secret::new(FIXTURE_TOKEN);
    let repo: RepoName = "acme-corp/web".parse().unwrap();
    let path = "/repos/acme-corp/web/keys/1234";

    fake.set("DELETE", path, vec![Canned::empty(204)]);
    c.delete_deploy_key(&token, &repo, 1234).await.unwrap();
    fake.set("DELETE", path, vec![Canned::json(404, E404)]);
    c.delete_deploy_key(&token, &repo, 1234).await.unwrap();
    fake.set("DELETE", path, vec![Canned::empty(502), Canned::empty(204)]);
    c.delete_deploy_key(&token, &repo, 1234).await.unwrap();
    assert_eq!(fake.count("DELETE", path), 4);
    fake.set("DELETE", path, vec![Canned::json(401, E401_CREDS)]);
    let e = c.delete_deploy_key(&token, &repo, 1234).await.unwrap_err();
    assert_eq!(
        e.code(),
        ErrorCode::GithubAuthFailed,
        "a dead token deletes nothing"
    );
}

// ---- GHES and URLs -------------------------------------------------------------------

#[tokio::test]
async fn ghes_paths_sit_under_api_v3() {
    let fake = FakeGithub::start().await;
    fake.set(
        "GET",
        &format!("/api/v3{INSTALL_PATH}"),
        vec![Canned::json(200, INSTALLATION)],
    );
    fake.set(
        "POST",
        &format!("/api/v3{MINT_PATH}"),
        vec![Canned::json(201, ACCESS_TOKEN)],
    );
    fake.set(
        "DELETE",
        "/api/v3/installation/token",
        vec![Canned::empty(204)],
    );
    let (c, _) = client_with(config(&format!("{}/api/v3/", fake.url()), PKCS8));
    assert_eq!(c.git_host(), fake.addr.to_string());
    let t = mint_web(&c).await.unwrap();
    c.revoke_installation_token(&t.token).await.unwrap();
    assert_eq!(fake.count("POST", &format!("/api/v3{MINT_PATH}")), 1);
    assert_eq!(fake.count("DELETE", "/api/v3/installation/token"), 1);
}

#[test]
fn git_hosts_follow_the_api_url() {
    let cases = [
        ("https://api.github.com", Ok("github.com")),
        ("https://api.github.com/", Ok("github.com")),
        ("https://ghe.example.com/api/v3", Ok("ghe.example.com")),
        (
            "https://ghe.example.com:8443/api/v3/",
            Ok("ghe.example.com:8443"),
        ),
        ("https://ghe.example.com:443/api/v3", Ok("ghe.example.com")),
        ("https://api.acme.ghe.com", Ok("acme.ghe.com")),
        ("http://127.0.0.1:8080", Ok("127.0.0.1:8080")),
        ("ftp://api.github.com", Err("not http(s)")),
        ("api.github.com", Err("not a URL")),
        ("https://user:pw@api.github.com", Err("credentials")),
        ("https://api.github.com/?x=1", Err("query")),
    ];
    for (url, want) in cases {
        match (git_host_for(url), want) {
            (Ok(host), Ok(w)) => assert_eq!(host, w, "{url}"),
            (Err(e), Err(w)) => {
                assert!(e.to_string().contains(w), "{url}: {e}");
                assert_eq!(e.code(), ErrorCode::Internal);
            }
            (got, want) => panic!("{url}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn construction_refuses_bad_settings() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let clock: crate::clock::SharedClock = Arc::new(OffsetClock::default());
    let mut bad_url = config("https://api.github.com/?x", PKCS1);
    bad_url.api_url = "gopher://x".into();
    let mut bad_slug = config("https://api.github.com", PKCS1);
    bad_slug.app_slug = Some("no spaces/allowed".into());
    let mut zero = config("https://api.github.com", PKCS1);
    zero.request_timeout = Duration::ZERO;
    let key_line = PKCS1.lines().nth(3).unwrap();
    let bad_key = config("https://api.github.com", &PKCS1.replace(key_line, "AAAA"));
    for cfg in [bad_url, bad_slug, zero, bad_key] {
        let e = GithubClient::new(cfg, clock.clone()).unwrap_err();
        assert!(matches!(e, GithubError::Config { .. }), "{e:?}");
        assert!(!format!("{e} {e:?}").contains(&key_line[..16]));
    }
}

// ---- secrets stay out of Debug and errors --------------------------------------------

#[tokio::test]
async fn debug_output_never_shows_key_jwt_or_token() {
    let fake = FakeGithub::start().await;
    fake.installed();
    let (c, _) = client(&fake);
    let t = mint_web(&c).await.unwrap();
    let jwt = fake.last("POST", MINT_PATH, |s| {
        s.header("authorization").unwrap().to_string()
    });
    let jwt = jwt.strip_prefix("Bearer ").unwrap();

    let shown = format!("{c:?} {t:?} {:?}", config(&fake.url(), PKCS1));
    for secret in [
        jwt,
        FIXTURE_TOKEN,
        &PKCS1.lines().nth(1).unwrap()[..24],
        &PKCS8.lines().nth(2).unwrap()[..24],
    ] {
        assert!(!shown.contains(secret), "secret in {shown}");
    }
    assert!(
        shown.contains("912345") && shown.contains(&fake.addr.to_string()),
        "useful Debug: {shown}"
    );

    // Errors carry GitHub's message, not what we sent.
    fake.set("POST", MINT_PATH, vec![Canned::json(401, E401_JWT)]);
    let e = mint_web(&c).await.unwrap_err();
    assert!(!format!("{e} {e:?}").contains(jwt));
}
