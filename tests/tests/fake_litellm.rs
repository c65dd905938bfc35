//! Tests of the fake LiteLLM itself: it must answer as the reference and its fixtures say, or
//! the broker's LiteLLM suites prove nothing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeSet;

use botcreds_tests::fake_litellm::{CallAuth, FakeLitellm, FakeLitellmConfig, hash_token};
use botcreds_tests::fixtures;
use serde_json::{Value, json};

fn client() -> reqwest::Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

async fn send(r: reqwest::RequestBuilder) -> (u16, Value) {
    let r = r.send().await.expect("fake reachable");
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, body)
}

fn fixture(name: &str) -> Value {
    fixtures::json(&format!("litellm/{name}"))
}

fn keys_of(v: &Value) -> BTreeSet<String> {
    v.as_object().expect("object").keys().cloned().collect()
}

#[tokio::test]
async fn authentication_follows_the_reference() {
    let fake = FakeLitellm::start(FakeLitellmConfig::default()).await;
    let c = client();
    let url = fake.url("/key/list");
    assert_eq!(
        send(c.get(&url)).await,
        (401, fixture("error-401-no-key.json"))
    );
    assert_eq!(
        send(c.get(&url).header("Authorization", fake.master_key())).await,
        (401, fixture("error-401-malformed-header.json"))
    );
    assert_eq!(
        send(c.get(&url).bearer_auth("sk-unknownunknownunknown")).await,
        (401, fixture("error-401-invalid-key.json"))
    );
    assert_eq!(
        send(c.get(&url).bearer_auth(fake.master_key())).await.0,
        200
    );
    assert_eq!(
        send(c.get(&url).header("x-litellm-api-key", fake.master_key()))
            .await
            .0,
        200
    );
    assert_eq!(
        send(c.get(&url).header("x-api-key", fake.master_key()))
            .await
            .0,
        200
    );
    let auths: Vec<CallAuth> = fake.calls().into_iter().map(|c| c.auth).collect();
    assert_eq!(auths[0], CallAuth::None);
    assert_eq!(auths[3], CallAuth::Master);
}

#[tokio::test]
async fn key_lifecycle_matches_the_fixtures() {
    let fake = FakeLitellm::start(FakeLitellmConfig::default()).await;
    let c = client();
    let master = fake.master_key().to_string();
    let request = fixture("key-generate.request.json");

    // generate: the fixture's field set, our values, the hashing rule.
    let (status, body) = send(
        c.post(fake.url("/key/generate"))
            .bearer_auth(&master)
            .json(&request),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        keys_of(&body),
        keys_of(&fixture("key-generate.response.json"))
    );
    let key = body["key"].as_str().unwrap().to_string();
    assert!(key.starts_with("sk-") && key.len() == 25, "{key}");
    let hash = hash_token(&key);
    assert_eq!(body["token"], json!(hash));
    assert_eq!(body["token_id"], json!(hash));
    assert_eq!(
        body["key_name"],
        json!(format!("sk-...{}", &key[key.len() - 4..]))
    );
    for field in [
        "key_alias",
        "models",
        "max_budget",
        "budget_duration",
        "rpm_limit",
        "metadata",
        "key_type",
    ] {
        assert_eq!(body[field], request[field], "{field}");
    }
    assert_eq!(body["duration"], Value::Null);
    assert!(body["expires"].as_str().unwrap().ends_with('Z'));

    // The alias is unique.
    let (status, dup) = send(
        c.post(fake.url("/key/generate"))
            .bearer_auth(&master)
            .json(&request),
    )
    .await;
    assert_eq!(
        (status, dup),
        (400, fixture("error-400-duplicate-alias.json"))
    );

    // A virtual key may not manage keys.
    let (status, body) = send(
        c.post(fake.url("/key/generate"))
            .bearer_auth(&key)
            .json(&json!({})),
    )
    .await;
    assert_eq!(
        (status, body),
        (403, fixture("error-403-route-not-allowed.json"))
    );

    // info by hash.
    let (status, info) = send(
        c.get(fake.url(&format!("/key/info?key={hash}")))
            .bearer_auth(&master),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(info["key"], json!(hash));
    assert_eq!(info["info"]["status"], "active");
    let want = keys_of(&fixture("key-info.response.json")["info"]);
    for field in [
        "key_name",
        "key_alias",
        "spend",
        "expires",
        "models",
        "max_budget",
        "status",
        "metadata",
        "rpm_limit",
    ] {
        assert!(
            want.contains(field) && info["info"].get(field).is_some(),
            "{field}"
        );
    }

    // list.
    let (_, list) = send(c.get(fake.url("/key/list")).bearer_auth(&master)).await;
    assert_eq!(keys_of(&list), keys_of(&fixture("key-list.response.json")));
    assert_eq!(list["keys"], json!([hash]));

    // chat: the allowed model works, others are refused.
    assert_eq!(fake.chat(&key, "gpt-4o-mini").await.0, 200);
    let (status, body) = fake.chat(&key, "claude-opus").await;
    assert_eq!(
        (status, body["error"]["type"].clone()),
        (403, json!("key_model_access_denied"))
    );

    // delete by hash: echoes what was sent; then the key stops working.
    let (status, body) = send(
        c.post(fake.url("/key/delete"))
            .bearer_auth(&master)
            .json(&json!({"keys": [hash]})),
    )
    .await;
    assert_eq!((status, body), (200, json!({"deleted_keys": [hash]})));
    assert!(fake.was_deleted(&key));
    assert_eq!(
        fake.chat(&key, "gpt-4o-mini").await,
        (401, fixture("error-401-invalid-key.json"))
    );
    let (status, body) = send(
        c.post(fake.url("/key/delete"))
            .bearer_auth(&master)
            .json(&json!({"keys": [hash]})),
    )
    .await;
    assert_eq!(
        (status, body),
        (404, fixture("error-404-delete-no-keys.json"))
    );
    let (status, body) = send(
        c.post(fake.url("/key/delete"))
            .bearer_auth(&master)
            .json(&json!({})),
    )
    .await;
    assert_eq!((status, body), (422, fixture("error-422-validation.json")));
    let (status, body) = send(
        c.get(fake.url("/key/info?key=deadbeef"))
            .bearer_auth(&master),
    )
    .await;
    assert_eq!(
        (status, body),
        (404, fixture("error-404-info-key-not-found.json"))
    );
    let (status, body) = send(
        c.post(fake.url("/key/update"))
            .bearer_auth(&master)
            .json(&json!({"key": "deadbeef"})),
    )
    .await;
    assert_eq!(
        (status, body),
        (404, fixture("error-404-update-key-not-found.json"))
    );
}

#[tokio::test]
async fn expiry_budget_aliases_and_enterprise_gates() {
    let fake = FakeLitellm::start(FakeLitellmConfig::default()).await;
    let c = client();
    let master = fake.master_key().to_string();
    let mint = |body: Value| {
        let c = c.clone();
        let (url, master) = (fake.url("/key/generate"), master.clone());
        async move { send(c.post(url).bearer_auth(master).json(&body)).await }
    };
    let (_, k) =
        mint(json!({"key_alias": "short", "duration": "1h", "models": ["m"], "max_budget": 1.0}))
            .await;
    let key = k["key"].as_str().unwrap().to_string();
    fake.set_spend(&key, 1.0);
    let (status, body) = fake.chat(&key, "m").await;
    assert_eq!(
        (status, body["error"]["type"].clone()),
        (422, json!("budget_exceeded"))
    );
    fake.advance_clock(3601);
    let (status, body) = fake.chat(&key, "m").await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["type"], "expired_key");
    assert_eq!(body["error"]["param"], k["key_name"]);
    assert!(fake.live_keys().is_empty());

    // Delete by alias echoes the aliases.
    let (status, body) = send(
        c.post(fake.url("/key/delete"))
            .bearer_auth(&master)
            .json(&fixture("key-delete-by-alias.request.json")),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    mint(json!({"key_alias": "lease-7f3c2a-ci-bot-07"})).await;
    let (status, body) = send(
        c.post(fake.url("/key/delete"))
            .bearer_auth(&master)
            .json(&fixture("key-delete-by-alias.request.json")),
    )
    .await;
    assert_eq!(
        (status, body),
        (200, fixture("key-delete-by-alias.response.json"))
    );

    // Enterprise-only fields and regeneration on an unlicensed proxy.
    assert_eq!(
        mint(json!({"tags": ["x"]})).await,
        (403, fixture("error-403-enterprise-field.json"))
    );
    let (_, k2) = mint(json!({"key_alias": "r"})).await;
    let (status, body) = send(
        c.post(fake.url(&format!(
            "/key/{}/regenerate",
            k2["token"].as_str().unwrap()
        )))
        .bearer_auth(&master)
        .json(&fixture("key-regenerate.request.json")),
    )
    .await;
    assert_eq!(status, 500);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Regenerating Virtual Keys is an Enterprise feature")
    );
    // Bad values.
    assert_eq!(mint(json!({"max_budget": -1})).await.0, 400);
    assert_eq!(mint(json!({"duration": "soon"})).await.0, 400);
    assert_eq!(mint(json!({"key": "short"})).await.0, 400);
}

#[tokio::test]
async fn regenerate_on_a_licensed_proxy_and_the_fake_coder() {
    let fake = FakeLitellm::start(FakeLitellmConfig {
        enterprise: true,
        ..FakeLitellmConfig::default()
    })
    .await;
    let c = client();
    let master = fake.master_key().to_string();
    let (_, k) = send(
        c.post(fake.url("/key/generate"))
            .bearer_auth(&master)
            .json(&json!({"key_alias": "r", "models": ["m"]})),
    )
    .await;
    let old = k["key"].as_str().unwrap().to_string();
    let (status, body) = send(
        c.post(fake.url("/key/regenerate"))
            .bearer_auth(&master)
            .json(&json!({"key": old, "duration": "1h"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["token"], Value::Null);
    assert_eq!(body["key_alias"], "r");
    let new = body["key"].as_str().unwrap().to_string();
    assert_eq!(fake.chat(&old, "m").await.0, 401);
    assert_eq!(fake.chat(&new, "m").await.0, 200);

    fake.add_coder_session("sess-alice", "usr-def456", "alice");
    let (status, me) = send(
        c.get(fake.url("/api/v2/users/me"))
            .header("Coder-Session-Token", "sess-alice"),
    )
    .await;
    assert_eq!(
        (status, me["username"].clone(), me["id"].clone()),
        (200, json!("alice"), json!("usr-def456"))
    );
    let (status, _) = send(
        c.get(fake.url("/api/v2/users/me"))
            .header("Coder-Session-Token", "nope"),
    )
    .await;
    assert_eq!(status, 401);
}

/// The broker's own client against the fake: the same endpoints, payloads and error mapping.
#[tokio::test]
async fn the_brokers_client_speaks_the_fakes_api() {
    use botcreds_broker::providers::litellm::{
        GenerateKey, LitellmApi, LitellmClient, LitellmClientConfig, LitellmError,
    };
    use botcreds_broker::secret::Secret;
    use std::time::Duration;

    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let fake = FakeLitellm::start(FakeLitellmConfig::default()).await;
    let client = |master: &str| {
        LitellmClient::new(LitellmClientConfig {
            url: fake.base_url(),
            master_key: Secret::new(master),
            request_timeout: Duration::from_secs(10),
            changed_by: "botcreds".into(),
        })
        .unwrap()
    };
    let c = client(fake.master_key());
    let ask = GenerateKey {
        key_alias: "ci-key".into(),
        duration_secs: 3600,
        models: vec!["claude-haiku-3-5".into()],
        max_budget: 10.0,
        budget_duration: Some("1d".into()),
        rpm_limit: 120,
        metadata: json!({"scope": "ci"}),
    };
    let k = c.generate(&ask).await.unwrap();
    assert_eq!(k.token_hash, hash_token(k.key.expose()));
    assert!(k.expires.is_some());
    let row = fake.key_by_alias("ci-key").unwrap();
    assert_eq!(
        (
            row.max_budget,
            row.budget_duration.as_deref(),
            row.rpm_limit
        ),
        (Some(10.0), Some("1d"), Some(120))
    );
    let info = c.info(&k.token_hash).await.unwrap().unwrap();
    assert_eq!(
        (info.status.as_str(), info.key_alias.as_deref()),
        ("active", Some("ci-key"))
    );
    // A duplicate alias is LiteLLM's 400, mapped to litellm_error with its (scrubbed) message.
    let dup = c.generate(&ask).await.unwrap_err();
    assert!(
        matches!(&dup, LitellmError::Upstream { status: 400, message } if message.contains("already exists")),
        "{dup:?}"
    );
    assert!(c.delete(&k.token_hash).await.unwrap());
    assert!(
        !c.delete(&k.token_hash).await.unwrap(),
        "404 is already gone"
    );
    assert_eq!(c.info("00ff").await.unwrap(), None);
    assert_eq!(c.stats().keys_generated, 1);

    let wrong = client("sk-not-the-master-key");
    let e = wrong.generate(&ask).await.unwrap_err();
    assert!(
        matches!(e, LitellmError::AuthFailed { status: 401, .. }),
        "{e:?}"
    );
    assert!(!format!("{e} {e:?}").contains("sk-not-the-master-key"));
    fake.set_down(true).await;
    let e = c.generate(&ask).await.unwrap_err();
    assert!(matches!(e, LitellmError::Unavailable { .. }), "{e:?}");
}

/// The real proxy (1.106.2, `auth_utils.py`) refuses a body carrying one of its banned
/// client-side parameters before it even looks at the credential; LiteLLM's own metadata walk
/// covers `metadata` and friends, the double every depth.
#[tokio::test]
async fn banned_request_body_params_are_refused_anywhere_in_the_body() {
    let fake = FakeLitellm::start(FakeLitellmConfig::default()).await;
    let c = client();
    let url = fake.url("/key/generate");
    let cases: Vec<(&str, Value, &str)> = vec![
        ("root", json!({"workspace_id": "w1"}), "workspace_id"),
        (
            "metadata, even null",
            json!({"metadata": {"scope": "ci", "workspace_id": null}}),
            "workspace_id",
        ),
        (
            "deep",
            json!({"metadata": {"a": [{"b": {"api_base": "http://evil"}}]}}),
            "api_base",
        ),
        (
            "metadata as JSON text",
            json!({"litellm_metadata": "{\"langfuse_host\": \"x\"}"}),
            "langfuse_host",
        ),
    ];
    for (what, body, param) in cases {
        for auth in [Some(fake.master_key().to_string()), None] {
            let mut r = c.post(&url).json(&body);
            if let Some(a) = &auth {
                r = r.bearer_auth(a);
            }
            let (status, answer) = send(r).await;
            assert_eq!(status, 401, "{what}: {answer}");
            let message = answer["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.starts_with(&format!(
                    "Authentication Error, Rejected Request: {param} is not allowed in request body."
                )),
                "{what}: {message}"
            );
            assert_eq!(answer["error"]["type"], "auth_error", "{what}");
        }
    }
    assert!(fake.live_keys().is_empty());
    // Names LiteLLM does not ban pass.
    let ok = json!({"key_alias": "fine", "duration": "1h",
                    "metadata": {"coder_workspace_id": "w1", "workspace_name": "dev"}});
    assert_eq!(
        send(c.post(&url).bearer_auth(fake.master_key()).json(&ok))
            .await
            .0,
        200
    );
}

/// `key_type` decides what a virtual key may call on the management routes, as in LiteLLM's
/// `route_checks.py`; an unknown type is a validation error.
#[tokio::test]
async fn key_type_decides_the_management_routes_a_virtual_key_reaches() {
    let fake = FakeLitellm::start(FakeLitellmConfig::default()).await;
    let c = client();
    let mint = |key_type: Value, alias: &str| {
        c.post(fake.url("/key/generate"))
            .bearer_auth(fake.master_key())
            .json(&json!({"key_alias": alias, "key_type": key_type}))
    };
    let (status, _) = send(mint(json!("superuser"), "bad")).await;
    assert_eq!(status, 422);
    let mut keys = Vec::new();
    for (t, alias) in [
        (json!("llm_api"), "a"),
        (json!("read_only"), "b"),
        (json!("default"), "c"),
        (Value::Null, "d"),
        (json!("management"), "e"),
    ] {
        let (status, body) = send(mint(t.clone(), alias)).await;
        assert_eq!(status, 200, "{t}: {body}");
        keys.push((t, body["key"].as_str().expect("key").to_string()));
    }
    for (t, key) in &keys {
        let (status, body) = send(
            c.post(fake.url("/key/generate"))
                .bearer_auth(key)
                .json(&json!({})),
        )
        .await;
        let message = body["error"]["message"].as_str().unwrap_or_default();
        if t == "llm_api" {
            assert_eq!(
                (status, body.clone()),
                (403, fixture("error-403-route-not-allowed.json"))
            );
        } else if t == "read_only" {
            assert_eq!(status, 403, "{t}: {body}");
            let detail = body["detail"].as_str().unwrap_or_default();
            assert!(detail.contains("['info_routes']"), "{body}");
        } else {
            assert_eq!(status, 401, "{t}: {body}");
            assert!(
                message.contains("Only proxy admin can be used"),
                "{t}: {message}"
            );
        }
        // Info: everything but an llm_api key, for any key of the same (no) user.
        let own = send(
            c.get(fake.url(&format!("/key/info?key={key}")))
                .bearer_auth(key),
        )
        .await
        .0;
        assert_eq!(own, if t == "llm_api" { 403 } else { 200 }, "{t}");
        let other = &keys.iter().find(|(_, k)| k != key).expect("another").1;
        let theirs = send(
            c.get(fake.url(&format!("/key/info?key={other}")))
                .bearer_auth(key),
        )
        .await
        .0;
        assert_eq!(theirs, own, "{t}");
    }
    let row = fake.key_by_alias("a").expect("a");
    assert_eq!(row.allowed_routes, vec!["llm_api_routes".to_string()]);
}
