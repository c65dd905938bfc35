//! Tests of the test doubles themselves: the fake GitHub and the fake tailscaled must answer exactly
//! as the reference and its fixtures say, or every end-to-end suite built on them proves nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use botcreds_tests::fake_github::{
    FakeGithub, FakeGithubConfig, InstallationSpec, RequestRecord, TokenFormat,
};
use botcreds_tests::fake_tailscaled::{FakeTailscaled, NodeBuilder, WhoIsBody};
use botcreds_tests::fixtures::{self, APP_ID, CLIENT_ID, INSTALLATION_ID, USER_INSTALLATION_ID};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Helpers

fn client() -> reqwest::Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent("botcreds-tests/0.1")
        .no_proxy()
        .build()
        .expect("reqwest client")
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .expect("ASCII header")
    }
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("request sent");
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.bytes().await.expect("body").to_vec(),
    }
}

async fn get_jwt(github: &FakeGithub, path: &str) -> Answer {
    send(
        client()
            .get(github.url(path))
            .bearer_auth(fixtures::valid_app_jwt()),
    )
    .await
}

async fn mint(github: &FakeGithub, installation: u64, body: Option<Value>) -> Answer {
    let mut request = client()
        .post(github.url(&format!("/app/installations/{installation}/access_tokens")))
        .bearer_auth(fixtures::valid_app_jwt())
        .header("Accept", "application/vnd.github+json");
    if let Some(body) = body {
        request = request.json(&body);
    }
    send(request).await
}

fn github_fixture(name: &str) -> Vec<u8> {
    fixtures::github(name)
}

/// Same keys at every level (arrays compared by their first element); `null` matches anything,
/// since GitHub's nullable fields are null or a value.
fn assert_same_shape(actual: &Value, expected: &Value, at: &str) {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => {
            let a_keys: BTreeSet<&String> = a.keys().collect();
            let e_keys: BTreeSet<&String> = e.keys().collect();
            assert_eq!(a_keys, e_keys, "keys differ at {at}");
            for (key, value) in e {
                assert_same_shape(&a[key], value, &format!("{at}.{key}"));
            }
        }
        (Value::Array(a), Value::Array(e)) => {
            if let (Some(a0), Some(e0)) = (a.first(), e.first()) {
                assert_same_shape(a0, e0, &format!("{at}[0]"));
            }
        }
        (Value::Null, _) | (_, Value::Null) => {}
        (Value::String(_), Value::String(_))
        | (Value::Number(_), Value::Number(_))
        | (Value::Bool(_), Value::Bool(_)) => {}
        _ => panic!("type differs at {at}: {actual} vs {expected}"),
    }
}

fn permissions(value: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(value.clone()).expect("permissions object")
}

// ---------------------------------------------------------------------------------------------
// Fake GitHub: the happy path

#[tokio::test]
async fn jwt_finds_the_installation_and_mints_a_scoped_token_shaped_like_the_fixture() {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;

    let found = get_jwt(&github, "/repos/acme-corp/web/installation").await;
    assert_eq!(found.status, 200);
    assert_eq!(
        found.header("content-type"),
        "application/json; charset=utf-8"
    );
    let installation = found.json();
    let expected = fixtures::json("github/installation.json");
    assert_same_shape(&installation, &expected, "installation");
    for field in [
        "id",
        "app_id",
        "app_slug",
        "client_id",
        "target_id",
        "target_type",
        "permissions",
        "repository_selection",
        "suspended_at",
    ] {
        assert_eq!(installation[field], expected[field], "installation.{field}");
    }
    assert_eq!(installation["account"]["login"], "acme-corp");
    assert_eq!(installation["account"]["type"], "Organization");
    assert_eq!(
        installation["access_tokens_url"],
        github.url("/app/installations/51234567/access_tokens")
    );

    let request = fixtures::json("github/access-token-request.json");
    let minted = mint(&github, INSTALLATION_ID, Some(request)).await;
    assert_eq!(minted.status, 201);
    let body = minted.json();
    let expected = fixtures::json("github/access-token.json");
    assert_same_shape(&body, &expected, "access-token");
    // Requested contents:read + pull_requests:write; GitHub adds metadata:read, as in the fixture.
    assert_eq!(
        permissions(&body["permissions"]),
        permissions(&expected["permissions"])
    );
    assert_eq!(body["repository_selection"], "selected");
    assert_eq!(body["repositories"][0]["full_name"], "acme-corp/web");
    assert_eq!(body["repositories"][0]["id"], 734501122);
    assert_eq!(body["repositories"].as_array().map(Vec::len), Some(1));

    let token = body["token"].as_str().expect("token");
    assert!(token.starts_with("ghs_"), "classic prefix");
    assert_eq!(token.len(), 40);
    assert!(token[4..].bytes().all(|b| b.is_ascii_alphanumeric()));

    let expires_at = time::OffsetDateTime::parse(
        body["expires_at"].as_str().expect("expires_at"),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("RFC 3339");
    let lifetime = expires_at - time::OffsetDateTime::now_utc();
    assert!(lifetime <= time::Duration::HOUR && lifetime > time::Duration::minutes(55));

    let info = github.token_info(token).expect("issued by the fake");
    assert_eq!(info.installation_id, INSTALLATION_ID);
    assert_eq!(info.owner, "acme-corp");
    assert_eq!(info.repositories, vec!["acme-corp/web".to_owned()]);
    assert_eq!(info.permissions, permissions(&body["permissions"]));
    assert_eq!(info.expires_at, expires_at);
    assert!(!info.revoked && info.is_active());
    assert!(info.allows("acme-corp/web", "contents", "read"));
    assert!(
        info.allows("ACME-CORP/Web", "pull_requests", "read"),
        "write covers read"
    );
    assert!(!info.allows("acme-corp/web", "contents", "write"));
    assert!(!info.allows("acme-corp/infra", "contents", "read"));
    assert_eq!(github.token_info("ghs_notissued"), None);
    assert_eq!(github.mint_count(), 1);

    let claims = github.last_jwt_claims().expect("a JWT was verified");
    assert_eq!(claims["iss"], APP_ID);
}

#[tokio::test]
async fn a_token_without_a_body_covers_the_whole_installation_like_the_all_repos_fixture() {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let minted = mint(&github, INSTALLATION_ID, None).await;
    assert_eq!(minted.status, 201);
    let body = minted.json();
    let expected = fixtures::json("github/access-token-all-repos.json");
    assert_same_shape(&body, &expected, "access-token-all-repos");
    assert_eq!(body["permissions"], expected["permissions"]);
    assert_eq!(
        body["repository_selection"],
        expected["repository_selection"]
    );

    let info = github
        .token_info(body["token"].as_str().expect("token"))
        .expect("issued");
    assert_eq!(
        info.repositories,
        vec!["acme-corp/web".to_owned(), "acme-corp/infra".to_owned()]
    );

    // An empty JSON object is the same request.
    let minted = mint(&github, INSTALLATION_ID, Some(json!({}))).await;
    assert_eq!(minted.status, 201);
    assert!(minted.json().get("repositories").is_none());
}

#[tokio::test]
async fn listing_endpoints_match_the_fixtures_and_paginate() {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;

    let list = get_jwt(&github, "/app/installations").await;
    assert_eq!(list.status, 200);
    let list_json = list.json();
    let expected = fixtures::json("github/installations-list.json");
    assert_same_shape(&list_json, &expected, "installations");
    assert_eq!(list_json.as_array().map(Vec::len), Some(2));
    assert_same_shape(&list_json[1], &expected[1], "installations[1]");
    assert_eq!(list_json[1]["suspended_at"], expected[1]["suspended_at"]);
    assert_eq!(list_json[1]["suspended_by"]["login"], "jdoe-dev");
    assert_eq!(list_json[1]["repository_selection"], "all");
    assert!(list.headers.get("link").is_none(), "one page only");

    let page = get_jwt(&github, "/app/installations?per_page=1").await;
    assert_eq!(page.json().as_array().map(Vec::len), Some(1));
    let link = page.header("link");
    assert!(link.contains("page=2>; rel=\"next\""), "{link}");
    assert!(link.contains("rel=\"last\""), "{link}");
    let second = get_jwt(&github, "/app/installations?per_page=1&page=2").await;
    assert_eq!(second.json()[0]["id"], USER_INSTALLATION_ID);
    assert!(second.header("link").contains("rel=\"prev\""));

    let by_id = get_jwt(&github, "/app/installations/51234567").await;
    assert_eq!(by_id.status, 200);
    assert_eq!(by_id.json()["id"], INSTALLATION_ID);
    let by_org = get_jwt(&github, "/orgs/ACME-CORP/installation").await;
    assert_eq!(by_org.status, 200, "owners are case-insensitive");
    let by_user = get_jwt(&github, "/users/jdoe-dev/installation").await;
    assert_eq!(by_user.status, 200);
    assert!(by_user.json()["suspended_at"].is_string());

    let app = get_jwt(&github, "/app").await;
    assert_eq!(app.status, 200);
    let app = app.json();
    assert_eq!(app["id"], APP_ID);
    assert_eq!(app["slug"], "acme-credbroker");
    assert_eq!(app["client_id"], CLIENT_ID);
    assert_eq!(app["installations_count"], 2);

    let minted = mint(&github, INSTALLATION_ID, None).await.json();
    let token = minted["token"].as_str().expect("token");
    let repos = send(
        client()
            .get(github.url("/installation/repositories"))
            .bearer_auth(token),
    )
    .await;
    assert_eq!(repos.status, 200);
    let repos_json = repos.json();
    let expected = fixtures::json("github/installation-repositories.json");
    assert_same_shape(&repos_json, &expected, "installation-repositories");
    assert_eq!(repos_json["total_count"], expected["total_count"]);
    let names: Vec<&str> = repos_json["repositories"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| r["full_name"].as_str())
        .collect();
    assert_eq!(names, ["acme-corp/web", "acme-corp/infra"]);
    for (actual, fixture) in repos_json["repositories"]
        .as_array()
        .expect("array")
        .iter()
        .zip(expected["repositories"].as_array().expect("array"))
    {
        assert_eq!(actual["id"], fixture["id"]);
    }
}

#[tokio::test]
async fn the_bot_user_and_installation_accounts_are_users() {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let bot = send(client().get(github.url("/users/acme-credbroker%5Bbot%5D"))).await;
    assert_eq!(bot.status, 200);
    let bot = bot.json();
    assert_eq!(bot["login"], "acme-credbroker[bot]");
    assert_eq!(bot["type"], "Bot");
    assert_eq!(bot["id"], FakeGithubConfig::default().bot_user_id);

    let org = send(client().get(github.url("/users/acme-corp"))).await;
    assert_eq!(org.json()["id"], fixtures::ORG_ACCOUNT_ID);
    let nobody = send(client().get(github.url("/users/nobody"))).await;
    assert_eq!(nobody.status, 404);
    assert_eq!(nobody.json()["message"], "Not Found");
}

// ---------------------------------------------------------------------------------------------
// Fake GitHub: refusals

#[tokio::test]
async fn bad_jwts_get_the_fixture_401_bodies() {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let now = fixtures::now_unix();
    let path = "/repos/acme-corp/web/installation";
    let bad_jwt = github_fixture("error-401-bad-jwt.json");

    let valid = fixtures::valid_app_jwt();
    let mut parts: Vec<String> = valid.split('.').map(str::to_owned).collect();
    parts[1] = base64::Engine::encode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        json!({ "iat": now - 60, "exp": now + 540, "iss": APP_ID + 1 }).to_string(),
    );
    let tampered = parts.join(".");
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({ "iat": now - 60, "exp": now + 540, "iss": APP_ID }),
        &jsonwebtoken::EncodingKey::from_secret(b"not the app key"),
    )
    .expect("HS256");
    let wrong_iss =
        fixtures::sign_app_jwt(&json!({ "iat": now - 60, "exp": now + 540, "iss": 123 }));

    for (what, auth) in [
        ("tampered payload", Some(format!("Bearer {tampered}"))),
        ("HS256", Some(format!("Bearer {hs256}"))),
        ("wrong iss", Some(format!("Bearer {wrong_iss}"))),
        ("garbage", Some("Bearer not.a.jwt".to_owned())),
        ("token scheme", Some(format!("token {valid}"))),
        ("no header", None),
    ] {
        let mut request = client().get(github.url(path));
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        let answer = send(request).await;
        assert_eq!(answer.status, 401, "{what}");
        assert_eq!(answer.body, bad_jwt, "{what}");
    }

    let too_far = fixtures::sign_app_jwt(&json!({ "iat": now, "exp": now + 660, "iss": APP_ID }));
    let answer = send(client().get(github.url(path)).bearer_auth(too_far)).await;
    assert_eq!(answer.status, 401);
    assert_eq!(
        answer.body,
        github_fixture("error-401-jwt-exp-too-far.json")
    );

    for (what, claims, message) in [
        (
            "expired",
            json!({ "iat": now - 700, "exp": now - 100, "iss": APP_ID }),
            "'Expiration time' claim ('exp') is in the past",
        ),
        (
            "iat ahead",
            json!({ "iat": now + 120, "exp": now + 500, "iss": APP_ID }),
            "'Issued at' claim ('iat') is in the future",
        ),
    ] {
        let answer = send(
            client()
                .get(github.url(path))
                .bearer_auth(fixtures::sign_app_jwt(&claims)),
        )
        .await;
        assert_eq!(answer.status, 401, "{what}");
        assert_eq!(answer.json()["message"], message, "{what}");
        assert_eq!(answer.json()["status"], "401", "{what}");
    }

    // The app id as a string, the client id, and a PKCS#8 signature of the same key are all fine.
    let pkcs8 =
        jsonwebtoken::EncodingKey::from_rsa_pem(fixtures::app_private_key_pkcs8_pem().as_bytes())
            .expect("PKCS#8 key");
    for (what, jwt) in [
        (
            "string iss",
            fixtures::sign_app_jwt(&json!({ "iat": now - 60, "exp": now + 540, "iss": "912345" })),
        ),
        (
            "client id iss",
            fixtures::sign_app_jwt(&json!({ "iat": now - 60, "exp": now + 540, "iss": CLIENT_ID })),
        ),
        (
            "PKCS#8",
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
                &json!({ "iat": now - 60, "exp": now + 600, "iss": APP_ID }),
                &pkcs8,
            )
            .expect("sign"),
        ),
    ] {
        let answer = send(client().get(github.url(path)).bearer_auth(jwt)).await;
        assert_eq!(answer.status, 200, "{what}");
    }

    // An installation token is no JWT.
    let token = mint(&github, INSTALLATION_ID, None).await.json()["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let answer = send(client().get(github.url(path)).bearer_auth(token)).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.body, bad_jwt);

    // GitHub's clock running ahead makes a JWT that was fine look expired.
    github.set_clock_skew(3600);
    assert_eq!(get_jwt(&github, path).await.status, 401);
    github.set_clock_skew(0);
    assert_eq!(get_jwt(&github, path).await.status, 200);
}

#[tokio::test]
async fn token_requests_beyond_the_installation_get_the_fixture_422s() {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let repositories_422 = github_fixture("error-422-repositories.json");
    let permissions_422 = github_fixture("error-422-permissions.json");
    for (what, body, expected) in [
        (
            "repository outside",
            json!({ "repositories": ["secret"] }),
            &repositories_422,
        ),
        (
            "owner/name form",
            json!({ "repositories": ["acme-corp/web"] }),
            &repositories_422,
        ),
        (
            "unknown repository id",
            json!({ "repository_ids": [1] }),
            &repositories_422,
        ),
        (
            "level above granted",
            json!({ "permissions": { "checks": "write" } }),
            &permissions_422,
        ),
        (
            "not granted",
            json!({ "permissions": { "issues": "read" } }),
            &permissions_422,
        ),
        (
            "unknown name",
            json!({ "permissions": { "test-permissions": "read" } }),
            &permissions_422,
        ),
        (
            "hyphenated name",
            json!({ "permissions": { "pull-requests": "write" } }),
            &permissions_422,
        ),
        (
            "level the name lacks",
            json!({ "permissions": { "contents": "admin" } }),
            &permissions_422,
        ),
    ] {
        let answer = mint(&github, INSTALLATION_ID, Some(body)).await;
        assert_eq!(answer.status, 422, "{what}");
        assert_eq!(&answer.body, expected, "{what}");
    }

    let by_id = mint(
        &github,
        INSTALLATION_ID,
        Some(json!({ "repository_ids": [734501987] })),
    )
    .await;
    assert_eq!(by_id.status, 201);
    assert_eq!(by_id.json()["repositories"][0]["name"], "infra");

    let malformed = send(
        client()
            .post(github.url("/app/installations/51234567/access_tokens"))
            .bearer_auth(fixtures::valid_app_jwt())
            .body("{not json"),
    )
    .await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.json()["message"], "Problems parsing JSON");

    assert_eq!(mint(&github, 999, None).await.status, 404);
    let suspended = mint(&github, USER_INSTALLATION_ID, None).await;
    assert_eq!(suspended.status, 403);
    assert_eq!(
        github.mint_count(),
        1,
        "only the repository_ids request minted"
    );
}

#[tokio::test]
async fn lookups_outside_the_installations_get_404s() {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let not_installed = github_fixture("error-404-not-installed.json");
    for path in [
        "/repos/acme-corp/nope/installation",
        "/repos/other-org/web/installation",
        "/repos/acme-corp/web.git/installation",
    ] {
        let answer = get_jwt(&github, path).await;
        assert_eq!(answer.status, 404, "{path}");
        assert_eq!(answer.body, not_installed, "{path}");
    }
    for path in [
        "/orgs/jdoe-dev/installation",
        "/users/other/installation",
        "/app/installations/1",
        "/app/installations/abc",
        "/no/such/endpoint",
    ] {
        let answer = get_jwt(&github, path).await;
        assert_eq!(answer.status, 404, "{path}");
        assert_eq!(answer.json()["message"], "Not Found", "{path}");
    }
}

#[tokio::test]
async fn revoked_and_expired_tokens_get_bad_credentials() {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let bad_credentials = github_fixture("error-401-bad-credentials.json");
    let token = mint(&github, INSTALLATION_ID, None).await.json()["token"]
        .as_str()
        .expect("token")
        .to_owned();

    // The older `token` scheme works for installation tokens.
    let listed = send(
        client()
            .get(github.url("/installation/repositories"))
            .header("Authorization", format!("token {token}")),
    )
    .await;
    assert_eq!(listed.status, 200);

    let revoked = send(
        client()
            .delete(github.url("/installation/token"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(revoked.status, 204);
    assert!(revoked.body.is_empty());
    assert!(github.token_info(&token).expect("known").revoked);
    assert!(
        !github
            .token_info(&token)
            .expect("known")
            .allows("acme-corp/web", "contents", "read")
    );

    for request in [
        client()
            .delete(github.url("/installation/token"))
            .bearer_auth(&token),
        client()
            .get(github.url("/installation/repositories"))
            .bearer_auth(&token),
        client()
            .delete(github.url("/installation/token"))
            .bearer_auth("ghs_000000000000000000000000000000000000"),
    ] {
        let answer = send(request).await;
        assert_eq!(answer.status, 401);
        assert_eq!(answer.body, bad_credentials);
    }
    let anonymous = send(client().get(github.url("/installation/repositories"))).await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.json()["message"], "Requires authentication");

    let second = mint(&github, INSTALLATION_ID, None).await.json()["token"]
        .as_str()
        .expect("token")
        .to_owned();
    github.expire_all();
    assert!(!github.token_info(&second).expect("known").is_active());
    let expired = send(
        client()
            .get(github.url("/installation/repositories"))
            .bearer_auth(&second),
    )
    .await;
    assert_eq!(expired.status, 401);
    assert_eq!(expired.body, bad_credentials);

    let third = mint(&github, INSTALLATION_ID, None).await.json()["token"]
        .as_str()
        .expect("token")
        .to_owned();
    github.revoke_all();
    assert!(github.token_info(&third).expect("known").revoked);
    assert_eq!(github.issued_tokens().len(), 3);
}

#[tokio::test]
async fn suspending_an_installation_stops_its_tokens() {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let token = mint(&github, INSTALLATION_ID, None).await.json()["token"]
        .as_str()
        .expect("token")
        .to_owned();
    assert!(github.set_suspended(INSTALLATION_ID, true));
    let answer = send(
        client()
            .get(github.url("/installation/repositories"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(answer.status, 403);
    assert_eq!(mint(&github, INSTALLATION_ID, None).await.status, 403);
    assert!(
        get_jwt(&github, "/app/installations/51234567").await.json()["suspended_at"].is_string()
    );
    assert!(github.set_suspended(INSTALLATION_ID, false));
    assert_eq!(mint(&github, INSTALLATION_ID, None).await.status, 201);
    assert!(!github.set_suspended(1, true));
}

#[tokio::test]
async fn a_request_without_user_agent_is_forbidden() {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let bare = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let answer = send(
        bare.get(github.url("/app"))
            .bearer_auth(fixtures::valid_app_jwt()),
    )
    .await;
    assert_eq!(answer.status, 403);
    assert!(String::from_utf8_lossy(&answer.body).contains("User-Agent"));
}

// ---------------------------------------------------------------------------------------------
// Fake GitHub: rate limits, failure injection, GHES, token formats, introspection

#[tokio::test]
async fn rate_limits_count_down_per_credential_and_can_be_forced() {
    let github = FakeGithub::start(FakeGithubConfig::default().rate_limit(3)).await;
    let rate_limited = github_fixture("error-403-rate-limited.json");

    // The app (JWT) window: 3 requests, then 403.
    let first = mint(&github, INSTALLATION_ID, None).await;
    assert_eq!(first.status, 201);
    assert_eq!(first.header("x-ratelimit-limit"), "3");
    assert_eq!(first.header("x-ratelimit-remaining"), "2");
    assert_eq!(first.header("x-ratelimit-used"), "1");
    assert_eq!(first.header("x-ratelimit-resource"), "core");
    let reset: i64 = first
        .header("x-ratelimit-reset")
        .parse()
        .expect("epoch seconds");
    assert!(reset > fixtures::now_unix());
    assert_eq!(
        get_jwt(&github, "/app")
            .await
            .header("x-ratelimit-remaining"),
        "1"
    );
    assert_eq!(
        get_jwt(&github, "/app")
            .await
            .header("x-ratelimit-remaining"),
        "0"
    );
    let over = get_jwt(&github, "/app").await;
    assert_eq!(over.status, 403);
    assert_eq!(over.body, rate_limited);
    assert_eq!(over.header("x-ratelimit-remaining"), "0");

    // The installation's window is separate.
    let token = first.json()["token"].as_str().expect("token").to_owned();
    let listed = send(
        client()
            .get(github.url("/installation/repositories"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.header("x-ratelimit-remaining"), "2");

    github.restore_rate_limit();
    assert_eq!(get_jwt(&github, "/app").await.status, 200);

    github.exhaust_rate_limit();
    let exhausted = send(
        client()
            .get(github.url("/installation/repositories"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(exhausted.status, 403);
    assert_eq!(exhausted.body, rate_limited);
    assert_eq!(exhausted.header("x-ratelimit-remaining"), "0");

    github.set_secondary_rate_limit(Duration::from_secs(30));
    let secondary = get_jwt(&github, "/app").await;
    assert_eq!(secondary.status, 429);
    assert_eq!(secondary.header("retry-after"), "30");
    assert_eq!(secondary.header("x-ratelimit-remaining"), "0");
    assert_eq!(secondary.json()["status"], "429");
    assert_eq!(
        secondary.json()["message"],
        fixtures::json("github/error-403-rate-limited.json")["message"]
    );

    github.restore_rate_limit();
    assert_eq!(get_jwt(&github, "/app").await.status, 200);
}

#[tokio::test]
async fn injected_failures_outages_and_delays() {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    github.fail_next(2, 502);
    assert_eq!(get_jwt(&github, "/app").await.status, 502);
    assert_eq!(mint(&github, INSTALLATION_ID, None).await.status, 502);
    assert_eq!(get_jwt(&github, "/app").await.status, 200);
    assert_eq!(github.mint_count(), 0);

    let kept = client();
    assert_eq!(
        send(kept.get(github.url("/users/acme-corp"))).await.status,
        200
    );
    github.set_down(true).await;
    assert!(
        client().get(github.url("/app")).send().await.is_err(),
        "refused while down"
    );
    assert!(
        kept.get(github.url("/users/acme-corp"))
            .send()
            .await
            .is_err(),
        "a kept-alive connection is dropped too"
    );
    github.set_down(false).await;
    assert_eq!(
        get_jwt(&github, "/app").await.status,
        200,
        "same port again"
    );

    github.set_delay(Duration::from_secs(30));
    let slow = reqwest::Client::builder()
        .user_agent("botcreds-tests/0.1")
        .no_proxy()
        .timeout(Duration::from_millis(200))
        .build()
        .expect("client");
    let error = slow
        .get(github.url("/users/acme-corp"))
        .send()
        .await
        .expect_err("delayed past the timeout");
    assert!(error.is_timeout());
    github.set_delay(Duration::ZERO);
    assert_eq!(
        send(client().get(github.url("/users/acme-corp")))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn ghes_serves_under_api_v3() {
    let github = FakeGithub::start(FakeGithubConfig::default().ghes()).await;
    assert!(github.base_url().ends_with("/api/v3"));
    assert_eq!(
        github.base_url(),
        format!("http://{}/api/v3", github.addr())
    );
    let installation = get_jwt(&github, "/repos/acme-corp/web/installation").await;
    assert_eq!(installation.status, 200);
    let tokens_url = installation.json()["access_tokens_url"]
        .as_str()
        .expect("url")
        .to_owned();
    assert_eq!(
        tokens_url,
        github.url("/app/installations/51234567/access_tokens")
    );
    let minted = send(
        client()
            .post(&tokens_url)
            .bearer_auth(fixtures::valid_app_jwt()),
    )
    .await;
    assert_eq!(minted.status, 201);

    let outside = send(
        client()
            .get(format!("http://{}/app", github.addr()))
            .bearer_auth(fixtures::valid_app_jwt()),
    )
    .await;
    assert_eq!(outside.status, 404);

    // The log is relative to the API root, whatever the prefix.
    assert_eq!(github.calls("/repos/"), 1);
    assert_eq!(github.calls("/app/installations/51234567/access_tokens"), 1);
    assert_eq!(
        github.requests()[0],
        RequestRecord {
            method: "GET".to_owned(),
            path: "/repos/acme-corp/web/installation".to_owned(),
            status: 200,
        }
    );
}

#[tokio::test]
async fn long_tokens_work_like_classic_ones() {
    let config = FakeGithubConfig::default()
        .token_format(TokenFormat::Long)
        .token_lifetime(Duration::from_secs(600));
    let github = FakeGithub::start(config).await;
    let minted = mint(
        &github,
        INSTALLATION_ID,
        Some(json!({ "repositories": ["infra"] })),
    )
    .await;
    assert_eq!(minted.status, 201);
    let token = minted.json()["token"].as_str().expect("token").to_owned();
    assert!(token.starts_with("ghs_912345_"), "stateless form");
    assert!(token.len() > 100);
    let info = github.token_info(&token).expect("issued");
    assert_eq!(info.repositories, vec!["acme-corp/infra".to_owned()]);
    assert!(info.expires_at - time::OffsetDateTime::now_utc() <= time::Duration::minutes(10));
    let listed = send(
        client()
            .get(github.url("/installation/repositories"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.json()["total_count"], 1);
}

#[tokio::test]
async fn custom_installations_and_introspection() {
    let config = FakeGithubConfig::empty().with_installation(
        InstallationSpec::organization("myorg", 77)
            .permission("contents", "write")
            .permission("issues", "write")
            .permission("repository_projects", "admin")
            .repositories(["repo-a", "repo-b", "sensitive-x"]),
    );
    let github = FakeGithub::start(config).await;
    assert_eq!(
        get_jwt(&github, "/repos/myorg/repo-b/installation")
            .await
            .json()["id"],
        77
    );
    let minted = mint(
        &github,
        77,
        Some(json!({
            "repositories": ["repo-a", "Repo-B"],
            "permissions": { "contents": "read", "repository_projects": "admin" }
        })),
    )
    .await;
    assert_eq!(minted.status, 201);
    let token = minted.json()["token"].as_str().expect("token").to_owned();
    let info = github.token_info(&token).expect("issued");
    assert_eq!(
        info.repositories,
        vec!["myorg/repo-a".to_owned(), "myorg/repo-b".to_owned()]
    );
    assert_eq!(
        info.permissions,
        BTreeMap::from([
            ("contents".to_owned(), "read".to_owned()),
            ("metadata".to_owned(), "read".to_owned()),
            ("repository_projects".to_owned(), "admin".to_owned()),
        ])
    );
    assert_eq!(github.calls("/app/installations/"), 1);
    assert_eq!(github.calls("/"), 2);
    let log = github.requests();
    assert_eq!(log.len(), 2);
    assert_eq!(log[1].method, "POST");
    assert_eq!(log[1].status, 201);
}

// ---------------------------------------------------------------------------------------------
// Fixture helpers

#[test]
fn the_private_key_file_is_written_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = fixtures::write_app_private_key(dir.path(), fixtures::KeyEncoding::Pkcs1);
    let mode = std::fs::metadata(&path)
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        std::fs::read_to_string(&path)
            .expect("read")
            .starts_with("-----BEGIN RSA PRIVATE KEY-----")
    );
}

// ---------------------------------------------------------------------------------------------
// Fake tailscaled

struct LocalAnswer {
    status: u16,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl LocalAnswer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .expect("ASCII header")
    }
}

/// One LocalAPI request over the Unix socket, as the Go client sends it (`Host: local-tailscaled.sock`
/// unless `host` says otherwise; `None` sends no Host at all).
async fn localapi(
    socket: &Path,
    target: &str,
    host: Option<&str>,
    extra: &[(&str, &str)],
) -> LocalAnswer {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let mut request = hyper::Request::builder().uri(target);
    if let Some(host) = host {
        request = request.header("Host", host);
    }
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new()).expect("request"))
        .await
        .expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    LocalAnswer {
        status,
        headers,
        body,
    }
}

async fn whois(tailscaled: &FakeTailscaled, addr: &str) -> LocalAnswer {
    localapi(
        tailscaled.socket_path(),
        &format!("/localapi/v0/whois?addr={addr}"),
        Some("local-tailscaled.sock"),
        &[],
    )
    .await
}

const BOT_IP: &str = "100.101.102.103";
const LAPTOP_IP: &str = "100.88.14.52";

#[tokio::test]
async fn whois_serves_fixture_nodes_byte_for_byte() {
    let tailscaled = FakeTailscaled::start().await;
    let ip: IpAddr = BOT_IP.parse().expect("ip");
    tailscaled.add_node(ip, WhoIsBody::fixture("whois-tagged-bot.json"));
    tailscaled.add_node(
        LAPTOP_IP.parse().expect("ip"),
        WhoIsBody::fixture("whois-user-laptop.json"),
    );

    let answer = whois(&tailscaled, "100.101.102.103%3A52344").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, fixtures::tailscale("whois-tagged-bot.json"));
    assert_eq!(answer.header("content-type"), "application/json");
    assert_eq!(
        answer.header("tailscale-version"),
        "1.103.0-t0a1b2c3d4-g9e8d7c6b5"
    );
    assert_eq!(answer.header("tailscale-cap"), "145");
    assert_eq!(answer.header("x-frame-options"), "DENY");
    let parsed: Value = serde_json::from_slice(&answer.body).expect("JSON");
    assert_eq!(parsed, fixtures::json("tailscale/whois-tagged-bot.json"));
    assert_eq!(parsed["Node"]["Tags"][0], "tag:ci");

    let laptop = whois(&tailscaled, "100.88.14.52:41641").await;
    assert_eq!(laptop.status, 200);
    assert_eq!(laptop.body, fixtures::tailscale("whois-user-laptop.json"));
    assert_eq!(tailscaled.whois_calls(), 2);
    assert_eq!(
        tailscaled.whois_addrs(),
        ["100.101.102.103:52344", "100.88.14.52:41641"]
    );
}

#[tokio::test]
async fn whois_accepts_every_address_form_tailscaled_does() {
    let tailscaled = FakeTailscaled::start().await;
    let added = tailscaled.add_node_at_addresses(WhoIsBody::fixture("whois-tagged-bot.json"));
    assert_eq!(added.len(), 2, "IPv4 and IPv6 from Node.Addresses");
    let fixture = fixtures::tailscale("whois-tagged-bot.json");
    for addr in [
        "100.101.102.103",
        "100.101.102.103:1",
        "%5Bfd7a:115c:a1e0::6b01:6667%5D:41641",
        "[fd7a:115c:a1e0::6b01:6667]:41641",
        "fd7a:115c:a1e0::6b01:6667",
        "%3A%3Affff%3A100.101.102.103",
        "[::ffff:100.101.102.103]:443",
        "nodekey:c515f38f96d445e1c04f6994e87f3c7095f3c62d911500958878d8b8287c4a2e",
    ] {
        let answer = whois(&tailscaled, addr).await;
        assert_eq!(answer.status, 200, "{addr}");
        assert_eq!(answer.body, fixture, "{addr}");
    }
}

/// A LocalAPI request that must fail: target, Host header, extra headers, status, body.
type ErrorCase = (
    &'static str,
    Option<&'static str>,
    &'static [(&'static str, &'static str)],
    u16,
    &'static str,
);

#[tokio::test]
async fn localapi_errors_are_go_http_errors() {
    let tailscaled = FakeTailscaled::start().await;
    tailscaled.add_node(
        BOT_IP.parse().expect("ip"),
        WhoIsBody::fixture("whois-tagged-bot.json"),
    );
    let socket = tailscaled.socket_path().to_owned();

    // The 404 exactly as recorded: status, every header of the fixture, body.
    let unknown = whois(&tailscaled, "100.64.0.9%3A1234").await;
    let recorded = fixtures::json("tailscale/whois-404.http.json");
    assert_eq!(Some(u64::from(unknown.status)), recorded["status"].as_u64());
    for (name, value) in recorded["headers"].as_object().expect("headers") {
        assert_eq!(
            unknown.header(name),
            value.as_str().expect("string"),
            "{name}"
        );
    }
    assert_eq!(unknown.body, fixtures::tailscale("whois-404.txt"));
    assert_eq!(
        recorded["body"].as_str().map(str::as_bytes),
        Some(unknown.body.as_slice())
    );

    let cases: [ErrorCase; 12] = [
        (
            "/localapi/v0/whois",
            Some("local-tailscaled.sock"),
            &[],
            400,
            "missing 'addr' parameter\n",
        ),
        (
            "/localapi/v0/whois?addr=",
            Some("local-tailscaled.sock"),
            &[],
            400,
            "missing 'addr' parameter\n",
        ),
        (
            "/localapi/v0/whois?ip=100.101.102.103",
            Some("local-tailscaled.sock"),
            &[],
            400,
            "missing 'addr' parameter\n",
        ),
        (
            "/localapi/v0/whois?addr=ci-bot-07",
            Some("local-tailscaled.sock"),
            &[],
            400,
            "invalid 'addr' parameter\n",
        ),
        (
            "/localapi/v0/whois?addr=100.101.102.103:99999",
            Some("local-tailscaled.sock"),
            &[],
            400,
            "invalid 'addr' parameter\n",
        ),
        (
            "/localapi/v0/whois?addr=nodekey:abc",
            Some("local-tailscaled.sock"),
            &[],
            400,
            "invalid nodekey in 'addr' parameter\n",
        ),
        (
            "/localapi/v0/whois?addr=100.101.102.103",
            Some("evil.example"),
            &[],
            403,
            "invalid localapi request\n",
        ),
        (
            "/localapi/v0/whois?addr=100.101.102.103",
            Some("local-tailscaled.sock"),
            &[("Origin", "http://evil.example")],
            403,
            "invalid localapi request\n",
        ),
        (
            "/localapi/v0/whois?addr=100.101.102.103",
            Some("local-tailscaled.sock"),
            &[("Referer", "http://evil.example/")],
            403,
            "invalid localapi request\n",
        ),
        (
            "/localapi/v0/no-such-endpoint",
            Some("local-tailscaled.sock"),
            &[],
            404,
            "404 page not found\n",
        ),
        (
            "/whois?addr=100.101.102.103",
            Some("local-tailscaled.sock"),
            &[],
            404,
            "404 page not found\n",
        ),
        (
            "/localapi/v0/whois?addr=100.101.102.103",
            Some("local-tailscaled.sock"),
            &[("X-Tailscale-Reason", "%%%")],
            400,
            "invalid reason header\n",
        ),
    ];
    for (target, host, extra, status, body) in cases {
        let answer = localapi(&socket, target, host, extra).await;
        assert_eq!(answer.status, status, "{target} {host:?} {extra:?}");
        assert_eq!(
            String::from_utf8_lossy(&answer.body),
            body,
            "{target} {host:?} {extra:?}"
        );
        assert_eq!(answer.header("content-type"), "text/plain; charset=utf-8");
        assert_eq!(
            answer.header("tailscale-version"),
            "1.103.0-t0a1b2c3d4-g9e8d7c6b5"
        );
        assert_eq!(answer.header("tailscale-cap"), "145");
    }

    // No Host header at all is accepted, as is an empty one.
    assert_eq!(
        localapi(
            &socket,
            "/localapi/v0/whois?addr=100.101.102.103",
            None,
            &[]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        localapi(
            &socket,
            "/localapi/v0/whois?addr=100.101.102.103",
            Some(""),
            &[]
        )
        .await
        .status,
        200
    );

    tailscaled.set_whois_denied(true);
    let denied = whois(&tailscaled, BOT_IP).await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.body, b"whois access denied\n");
}

#[tokio::test]
async fn the_builder_reproduces_the_fixtures_byte_for_byte() {
    let tagged = NodeBuilder::new("ci-bot-07")
        .node_id(7164412000118811)
        .stable_id("nQ4wFz5tK21CNTRL")
        .user_id(5201133779012345)
        .node_key("nodekey:c515f38f96d445e1c04f6994e87f3c7095f3c62d911500958878d8b8287c4a2e")
        .machine_key("mkey:e22f2805e9520c840554e9f27a2c5a100b41084ca89241640c99b041c155a006")
        .disco_key("discokey:9f3b07d8b3572dbba10a7fa9097445a054beeebedf2fa77636453b5861d7ac91")
        .addresses(["100.101.102.103".parse().expect("ip"), "fd7a:115c:a1e0::6b01:6667".parse().expect("ip")])
        .endpoints(["203.0.113.17:41641", "10.20.0.7:41641"])
        .home_derp(4)
        .ipn_version("1.102.1-tb7c1a2d3e-g4f5e6d7c8")
        .os_version("6.8.0-45-generic")
        .created("2026-05-11T08:22:19Z")
        .cap(140)
        .tags(["tag:ci"])
        .capability_raw(
            "example.com/cap/credbroker",
            [
                r#"{"github": {"repos": ["acme-corp/web"], "permissions": {"contents": "read", "pull_requests": "write"}, "deploy_key": false}}"#,
                r#"{"litellm": {"models": ["gpt-4o-mini"], "max_budget": 5, "duration": "1h"}}"#,
            ],
        )
        .build();
    assert_eq!(
        String::from_utf8_lossy(tagged.bytes()),
        fixtures::string("tailscale/whois-tagged-bot.json")
    );

    let laptop = NodeBuilder::new("alice-mbp")
        .node_id(6098830112044556)
        .stable_id("nHb7Yc2Pq91CNTRL")
        .user_id(3117700112233445)
        .node_key("nodekey:1d8e6f9c00fe8d36f3cf91dc39a2a8bae4deb763f4cb8f791afa3c8303ed809f")
        .key_expiry("2027-01-19T10:31:02Z")
        .machine_key("mkey:cb994701495e98a4ffd7c4fb9952061cce136bc9c85b081e7d3d956be3c1bc9e")
        .disco_key("discokey:fb1c2eca9093913231ee4855b242febc9480d9c1609e32a62ee800d817d12a79")
        .addresses([
            "100.88.14.52".parse().expect("ip"),
            "fd7a:115c:a1e0::a101:e34".parse().expect("ip"),
        ])
        .endpoints(["198.51.100.40:41641", "192.168.1.23:41641"])
        .home_derp(1)
        .os("macOS")
        .os_version("15.6.1")
        .os_hostname("Alices-MacBook-Pro")
        .created("2025-07-21T10:31:02Z")
        .last_seen("2026-08-22T11:58:40Z")
        .login("alice@example.com")
        .display_name("Alice Example")
        .profile_pic_url("https://lh3.googleusercontent.com/a/ACg8ocKexampleExampleExample=s96-c")
        .groups(["group:eng"])
        .build();
    assert_eq!(
        String::from_utf8_lossy(laptop.bytes()),
        fixtures::string("tailscale/whois-user-laptop.json")
    );
}

#[tokio::test]
async fn builder_nodes_have_tailscaleds_shape_and_are_served() {
    let tailscaled = FakeTailscaled::start().await;
    let bot_ip: IpAddr = "100.70.1.2".parse().expect("ip");
    let bot = NodeBuilder::new("review-bot")
        .address(bot_ip)
        .tags(["tag:bots", "tag:review"])
        .capability(
            "example.com/cap/credbroker",
            [json!({ "github": { "repos": ["a/<b>&c"] } })],
        )
        .capability("example.com/cap/empty", [])
        .build();
    tailscaled.add_node(bot_ip, bot.clone());
    let answer = whois(&tailscaled, "100.70.1.2%3A40000").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, bot.bytes());

    let text = String::from_utf8(answer.body).expect("UTF-8");
    assert!(
        text.starts_with("{\n\t\"Node\": {\n\t\t\"ID\": "),
        "tab-indented: {text}"
    );
    assert!(text.ends_with('}'), "no trailing newline");
    assert!(text.contains("\"example.com/cap/empty\": null"));
    assert!(
        text.contains("a/\\u003cb\\u003e\\u0026c"),
        "Go escapes <, > and &"
    );
    let parsed: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(parsed["Node"]["Name"], "review-bot.tail3f9c2.ts.net.");
    assert_eq!(parsed["Node"]["Tags"], json!(["tag:bots", "tag:review"]));
    assert_eq!(parsed["Node"]["Addresses"], json!(["100.70.1.2/32"]));
    assert_eq!(parsed["Node"]["ComputedName"], "review-bot");
    assert_eq!(parsed["Node"]["ComputedNameWithHost"], "review-bot");
    assert_eq!(parsed["UserProfile"]["LoginName"], "tagged-devices");
    assert_eq!(parsed["UserProfile"]["DisplayName"], "Tagged Devices");
    assert_eq!(parsed["Node"]["User"], parsed["UserProfile"]["ID"]);
    assert!(parsed["Node"].get("KeyExpiry").is_none(), "omitempty");
    assert_eq!(
        parsed["CapMap"]["example.com/cap/credbroker"][0]["github"]["repos"][0],
        "a/<b>&c"
    );

    let user = NodeBuilder::new("dev-box")
        .login("bob@example.com")
        .computed_name("bobs-box")
        .build();
    let addresses = tailscaled.add_node_at_addresses(user.clone());
    assert_eq!(addresses.len(), 2, "derived IPv4 and IPv6");
    assert!(matches!(addresses[0], IpAddr::V4(v4) if v4.octets()[0] == 100));
    let answer = whois(&tailscaled, &addresses[0].to_string()).await;
    assert_eq!(answer.body, user.bytes());
    let parsed: Value = serde_json::from_slice(&answer.body).expect("JSON");
    assert_eq!(parsed["CapMap"], Value::Null);
    assert!(String::from_utf8_lossy(&answer.body).contains("\"CapMap\": null"));
    assert!(parsed["Node"].get("Tags").is_none());
    assert_eq!(parsed["UserProfile"]["LoginName"], "bob@example.com");
    assert_eq!(parsed["UserProfile"]["DisplayName"], "bob");
    assert_eq!(parsed["Node"]["ComputedNameWithHost"], "bobs-box (dev-box)");
    assert_eq!(
        NodeBuilder::new("dev-box")
            .login("bob@example.com")
            .computed_name("bobs-box")
            .build()
            .bytes(),
        user.bytes(),
        "deterministic"
    );
}

#[tokio::test]
async fn tailscaled_knobs_remove_fail_and_go_down() {
    let tailscaled = FakeTailscaled::start().await;
    let ip: IpAddr = BOT_IP.parse().expect("ip");
    tailscaled.add_node(ip, WhoIsBody::fixture("whois-tagged-bot.json"));

    tailscaled.fail_next(1);
    let failed = whois(&tailscaled, BOT_IP).await;
    assert_eq!(failed.status, 500);
    assert_eq!(failed.body, b"server has no local backend\n");
    assert_eq!(whois(&tailscaled, BOT_IP).await.status, 200);

    assert!(tailscaled.remove_node(ip));
    assert!(!tailscaled.remove_node(ip));
    assert_eq!(whois(&tailscaled, BOT_IP).await.status, 404);
    tailscaled.add_node(ip, WhoIsBody::from_bytes("not json at all"));
    assert_eq!(whois(&tailscaled, BOT_IP).await.body, b"not json at all");
    assert_eq!(tailscaled.whois_calls(), 4);

    tailscaled.set_down(true).await;
    let error = tokio::net::UnixStream::connect(tailscaled.socket_path())
        .await
        .expect_err("no socket while down");
    assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
    tailscaled.set_down(false).await;
    assert_eq!(whois(&tailscaled, BOT_IP).await.status, 200);
    assert_eq!(tailscaled.whois_calls(), 5);
}

async fn local_get(tailscaled: &FakeTailscaled, target: &str) -> LocalAnswer {
    localapi(
        tailscaled.socket_path(),
        target,
        Some("local-tailscaled.sock"),
        &[],
    )
    .await
}

/// A P-256 key (PKCS#8 PEM, as rcgen writes it) and a self-signed certificate for `domain`.
fn key_and_cert(domain: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![domain.to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    (key.serialize_pem(), cert.pem())
}

#[tokio::test]
async fn status_reports_the_node_name_and_cert_domains_like_tailscaled() {
    use botcreds_tests::fake_tailscaled::SelfNode;
    let tailscaled = FakeTailscaled::start().await;

    // Logged out: no name, no certificate domains.
    let out = local_get(&tailscaled, "/localapi/v0/status?peers=false").await;
    assert_eq!(out.status, 200);
    assert_eq!(out.header("content-type"), "application/json");
    let status: Value = serde_json::from_slice(&out.body).expect("JSON");
    assert_eq!(status["BackendState"], "NeedsLogin");
    assert_eq!(status["Self"]["DNSName"], "");
    assert_eq!(status["CertDomains"], Value::Null);

    tailscaled.set_self(SelfNode::new("bot-broker", "tailnet-1234.ts.net"));
    let out = local_get(&tailscaled, "/localapi/v0/status").await;
    let text = String::from_utf8(out.body).expect("UTF-8");
    // Go's json.Encoder with SetIndent("", "\t"): tabs and a trailing newline.
    assert!(text.starts_with("{\n\t\"Version\": "), "{text}");
    assert!(text.ends_with("}\n"), "{text}");
    let status: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(status["BackendState"], "Running");
    assert_eq!(status["Self"]["DNSName"], "bot-broker.tailnet-1234.ts.net.");
    assert_eq!(status["Self"]["HostName"], "bot-broker");
    assert_eq!(status["MagicDNSSuffix"], "tailnet-1234.ts.net");
    assert_eq!(
        status["CurrentTailnet"]["MagicDNSSuffix"],
        "tailnet-1234.ts.net"
    );
    assert_eq!(
        status["CertDomains"],
        json!(["bot-broker.tailnet-1234.ts.net"])
    );

    tailscaled.set_self(SelfNode::new("bot-broker", "tailnet-1234.ts.net").without_https());
    let out = local_get(&tailscaled, "/localapi/v0/status").await;
    let status: Value = serde_json::from_slice(&out.body).expect("JSON");
    assert_eq!(status["CertDomains"], Value::Null);
}

#[tokio::test]
async fn cert_serves_the_pair_and_refuses_like_tailscaled() {
    use botcreds_tests::fake_tailscaled::{CertPair, SelfNode};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateSec1KeyDer};

    const DOMAIN: &str = "bot-broker.tailnet-1234.ts.net";
    let tailscaled = FakeTailscaled::start().await;
    let (key_pem, cert_pem) = key_and_cert(DOMAIN);
    tailscaled.set_cert_pair(DOMAIN, CertPair::from_pkcs8(&key_pem, &cert_pem));

    // No HTTPS certificates for the tailnet (and logged out): tailscaled's message.
    let out = local_get(
        &tailscaled,
        &format!("/localapi/v0/cert/{DOMAIN}?type=pair"),
    )
    .await;
    assert_eq!(out.status, 500);
    assert_eq!(
        out.body,
        b"your Tailscale account does not support getting TLS certs\n"
    );
    assert_eq!(out.header("content-type"), "text/plain; charset=utf-8");

    tailscaled.set_self(SelfNode::new("bot-broker", "tailnet-1234.ts.net"));
    let pair = local_get(
        &tailscaled,
        &format!("/localapi/v0/cert/{DOMAIN}?type=pair"),
    )
    .await;
    assert_eq!(pair.status, 200);
    assert_eq!(pair.header("content-type"), "text/plain");
    assert_eq!(pair.header("tailscale-cap"), "145");
    let text = String::from_utf8(pair.body).expect("PEM");
    // The key first, as SEC1 the way Go's x509.MarshalECPrivateKey writes it, then the chain.
    assert!(
        text.starts_with("-----BEGIN EC PRIVATE KEY-----\n"),
        "{text}"
    );
    assert!(text.ends_with(&cert_pem), "{text}");
    let sec1 = PrivateSec1KeyDer::from_pem_slice(text.as_bytes()).expect("a SEC1 key");
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(sec1.into())
        .expect("a usable key");
    let certified = rustls::sign::CertifiedKey::new(
        vec![CertificateDer::from_pem_slice(text.as_bytes()).expect("certificate")],
        signer,
    );
    certified
        .keys_match()
        .expect("the key belongs to the certificate");

    for (kind, want) in [
        ("", cert_pem.as_str()),
        ("cert", &cert_pem),
        ("crt", &cert_pem),
    ] {
        let out = local_get(
            &tailscaled,
            &format!("/localapi/v0/cert/{DOMAIN}?type={kind}"),
        )
        .await;
        assert_eq!(
            (out.status, out.body.as_slice()),
            (200, want.as_bytes()),
            "{kind}"
        );
    }
    let key_only = local_get(&tailscaled, &format!("/localapi/v0/cert/{DOMAIN}?type=key")).await;
    assert!(text.starts_with(std::str::from_utf8(&key_only.body).expect("PEM")));

    for (target, status, message) in [
        (
            format!("/localapi/v0/cert/{DOMAIN}?type=der"),
            400,
            "invalid type; want \"cert\" (default), \"key\", or \"pair\"\n",
        ),
        (
            "/localapi/v0/cert/other.tailnet-1234.ts.net?type=pair".to_string(),
            500,
            "invalid domain \"other.tailnet-1234.ts.net\"; must be one of [\"bot-broker.tailnet-1234.ts.net\"]\n",
        ),
        (
            "/localapi/v0/cert/localhost?type=pair".to_string(),
            500,
            "invalid domain\n",
        ),
        (
            "/localapi/v0/cert/a..b?type=pair".to_string(),
            500,
            "invalid domain\n",
        ),
    ] {
        let out = local_get(&tailscaled, &target).await;
        assert_eq!(
            (out.status, String::from_utf8_lossy(&out.body).as_ref()),
            (status, message),
            "{target}"
        );
    }

    tailscaled.set_cert_denied(true);
    let out = local_get(
        &tailscaled,
        &format!("/localapi/v0/cert/{DOMAIN}?type=pair"),
    )
    .await;
    assert_eq!(
        (out.status, out.body.as_slice()),
        (403, &b"cert access denied\n"[..])
    );
    assert_eq!(
        tailscaled.cert_requests().first().map(String::as_str),
        Some("bot-broker.tailnet-1234.ts.net?type=pair")
    );
}

// ---------------------------------------------------------------------------------------------
// Deploy keys (reference §4.5)

async fn token_for(github: &FakeGithub, repositories: &[&str], permissions: Value) -> String {
    let minted = mint(
        github,
        INSTALLATION_ID,
        Some(json!({"repositories": repositories, "permissions": permissions})),
    )
    .await;
    assert_eq!(
        minted.status,
        201,
        "{}",
        String::from_utf8_lossy(&minted.body)
    );
    minted.json()["token"].as_str().expect("token").to_owned()
}

const PUBLIC_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ2m7tW7n7cZbq1kZ2YbY3Rlc3RrZXlmb3JkZXBsb3lrZXlz bot@example";

#[tokio::test]
async fn deploy_keys_are_added_listed_and_deleted_with_administration_write() {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let token = token_for(&github, &["web"], json!({"administration": "write"})).await;
    let keys = github.url("/repos/acme-corp/web/keys");

    let added = send(
        client()
            .post(&keys)
            .bearer_auth(&token)
            .json(&json!({"title": "bot-1 cred-1", "key": PUBLIC_KEY, "read_only": true})),
    )
    .await;
    assert_eq!(
        added.status,
        201,
        "{}",
        String::from_utf8_lossy(&added.body)
    );
    let body = added.json();
    for field in [
        "id",
        "key",
        "url",
        "title",
        "verified",
        "created_at",
        "read_only",
    ] {
        assert!(body.get(field).is_some(), "deploy-key.{field} missing");
    }
    assert_eq!(body["read_only"], true);
    assert_eq!(body["title"], "bot-1 cred-1");
    let id = body["id"].as_u64().expect("numeric id");
    let held = github.deploy_keys();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].id, id);
    assert_eq!(held[0].repository, "acme-corp/web");
    assert!(held[0].read_only);

    // The same key again, on any repository: 422 "key is already in use".
    let infra_token = token_for(
        &github,
        &["web", "infra"],
        json!({"administration": "write"}),
    )
    .await;
    let again = send(
        client()
            .post(github.url("/repos/acme-corp/infra/keys"))
            .bearer_auth(&infra_token)
            .json(&json!({"title": "again", "key": PUBLIC_KEY, "read_only": false})),
    )
    .await;
    assert_eq!(again.status, 422);
    assert_eq!(
        again.json()["errors"][0]["message"],
        "key is already in use"
    );

    let listed = send(client().get(&keys).bearer_auth(&token)).await;
    assert_eq!(listed.status, 200);
    assert_eq!(listed.json().as_array().map(Vec::len), Some(1));

    let one = format!("{keys}/{id}");
    let deleted = send(client().delete(&one).bearer_auth(&token)).await;
    assert_eq!(deleted.status, 204);
    assert!(github.deploy_keys().is_empty());
    let twice = send(client().delete(&one).bearer_auth(&token)).await;
    assert_eq!(twice.status, 404, "a double delete is 404");

    // Without read_only (or with anything but true) the key is read-write.
    let write = send(
        client()
            .post(&keys)
            .bearer_auth(&token)
            .json(&json!({"key": PUBLIC_KEY})),
    )
    .await;
    assert_eq!(write.status, 201);
    assert_eq!(write.json()["read_only"], false);
}

#[tokio::test]
async fn deploy_keys_refuse_tokens_without_administration_write_or_the_repository() {
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let body = json!({"title": "t", "key": PUBLIC_KEY, "read_only": true});

    let contents_only = token_for(&github, &["web"], json!({"contents": "write"})).await;
    let refused = send(
        client()
            .post(github.url("/repos/acme-corp/web/keys"))
            .bearer_auth(&contents_only)
            .json(&body),
    )
    .await;
    assert_eq!(refused.status, 403);
    assert_eq!(
        refused.header("x-accepted-github-permissions"),
        "administration=write"
    );

    let web_only = token_for(&github, &["web"], json!({"administration": "write"})).await;
    let elsewhere = send(
        client()
            .post(github.url("/repos/acme-corp/infra/keys"))
            .bearer_auth(&web_only)
            .json(&body),
    )
    .await;
    assert_eq!(elsewhere.status, 404);

    let anonymous = send(
        client()
            .post(github.url("/repos/acme-corp/web/keys"))
            .json(&body),
    )
    .await;
    assert_eq!(anonymous.status, 401);

    let malformed = send(
        client()
            .post(github.url("/repos/acme-corp/web/keys"))
            .bearer_auth(&web_only)
            .json(&json!({"key": "not a key"})),
    )
    .await;
    assert_eq!(malformed.status, 422);
    assert!(github.deploy_keys().is_empty(), "nothing refused was kept");

    let delete = send(
        client()
            .delete(github.url("/repos/acme-corp/web/keys/1"))
            .bearer_auth(&contents_only),
    )
    .await;
    assert_eq!(delete.status, 403);
}
