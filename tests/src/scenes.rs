//! The worlds of the suites that are split between the real binary and the in-process API
//! tests (`tests/tests/api/`): each scene's policy, its callers' addresses and keys, and its
//! [`WorldBuilder`], so both halves of a suite start from the same world.

/// `broker_e2e` and `api::credentials`: the GitHub token flow from tailnet identity and API keys.
pub mod broker {
    use serde_json::{Value, json};

    use crate::fake_tailscaled::NodeBuilder;
    use crate::world::{World, WorldBuilder};

    pub const POLICY: &str = r#"
bots:
  ci-bot:
    identity: { tag: "tag:ci" }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:write, pull_requests:write]
      - repo: "acme-corp/*"
        permissions: [contents:read]
      - repo: "acme-corp/web"
        permissions: [issues:write]
      - repo: "ghost-org/*"
        permissions: [contents:read]
    requires_approval:
      - permissions: [admin]
    deny:
      - repo: "acme-corp/infra"
  laptop-bot:
    identity: { type: tailnet, hostname: alice-laptop }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
  script-bot:
    identity: { type: api_key }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

    pub const CI: &str = "127.0.0.2";
    pub const LAPTOP: &str = "127.0.0.3";
    pub const STRANGER: &str = "127.0.0.4";
    pub const NOT_ON_TAILNET: &str = "127.0.0.5";
    pub const SCRIPT_KEY: &str = "bck_e2eScriptKey0123456789abcdefghij";

    /// ci-bot (`tag:ci`), alice's laptop, bob's node; script-bot's API key.
    pub fn setup() -> WorldBuilder {
        World::builder(POLICY)
            .node(CI, NodeBuilder::new("ci-bot-07").tags(["tag:ci"]))
            .node(
                LAPTOP,
                NodeBuilder::new("alice-laptop").login("alice@example.com"),
            )
            .node(
                STRANGER,
                NodeBuilder::new("stranger").login("bob@example.com"),
            )
            .api_key("script-bot", SCRIPT_KEY)
    }

    pub fn token_request(repos: &[&str], perms: &[&str]) -> Value {
        json!({"kind": "github_token", "repositories": repos, "permissions": perms, "reason": "e2e"})
    }
}

/// `security_attacks` and `api::attacks`: the negative-security tables by attack class. Each row
/// is the attack as sent, the status and stable code it must be refused with, and the check
/// that nothing stored changed and the audit log grew by refusals only.
pub mod attacks {
    use std::time::Duration;

    use botcreds_proto::approval::AuditList;
    use botcreds_proto::audit::{AuditEvent, AuditEventKind};
    use botcreds_proto::{ErrorBody, ErrorCode};
    use serde_json::{Value, json};

    use crate::fake_tailscaled::NodeBuilder;
    use crate::world::{Broker, World, WorldBuilder, ip};

    pub const POLICY: &str = r#"
bots:
  ci-bot:
    identity: { tag: "tag:ci" }
    deny:
      - repo: "acme-corp/infra"
    auto_approve:
      - repo: "acme-corp/*"
        permissions: [contents:read]
    requires_approval:
      - repo: "acme-corp/*"
        permissions: [contents:write]
  review-bot:
    identity: { type: api_key }
    auto_approve:
      - litellm_scope: "agent:review"
  cert-bot:
    identity: { type: mtls }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
  ops:
    identity: { type: api_key }
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

    /// alice: a tailnet user who is an admin (`[admin] users`).
    pub const ALICE: &str = "127.0.0.1";
    /// ci-bot's node (`tag:ci`).
    pub const CI: &str = "127.0.0.2";
    /// A tagged node (`tag:ci`) whose owner is alice: a tagged node is never its owner.
    pub const TAGGED_ALICE: &str = "127.0.0.3";
    /// A user whose login looks like alice's (Cyrillic `а` in the domain).
    pub const LOOKALIKE: &str = "127.0.0.4";
    /// An untagged user whose login is the admin tag's text.
    pub const TAG_LOGIN: &str = "127.0.0.5";
    /// bob: another admin user.
    pub const BOB: &str = "127.0.0.6";
    /// A user on the tailnet with no role.
    pub const CAROL: &str = "127.0.0.7";
    /// An address tailscaled does not know.
    pub const UNKNOWN: &str = "127.0.0.9";

    /// An admin API key (`[admin] api_key_bots`), used to read the stored state.
    pub const OPS_KEY: &str = "bck_attOpsAdminKey0123456789abcdefghij";
    /// review-bot's API key: a bot, not an admin.
    pub const REVIEW_KEY: &str = "bck_attReviewBotKey0123456789abcdefgh";
    pub const SECRET: &str = "provisioner-secret-attacks-0123456789";

    /// Everything configured: GitHub, tailnet identity, LiteLLM with Coder and the provisioner
    /// secret, mTLS, admins by user, tag and API key; `limits` is appended as is.
    pub fn setup(limits: &str) -> WorldBuilder {
        World::builder(POLICY)
            .node(
                ALICE,
                NodeBuilder::new("alice-desk").login("alice@example.com"),
            )
            .node(CI, NodeBuilder::new("ci-bot-07").tags(["tag:ci"]))
            .node(
                TAGGED_ALICE,
                NodeBuilder::new("alice-ci")
                    .tags(["tag:ci"])
                    .login("alice@example.com"),
            )
            .node(
                LOOKALIKE,
                NodeBuilder::new("mallory").login("alice@ex\u{430}mple.com"),
            )
            .node(TAG_LOGIN, NodeBuilder::new("tagger").login("tag:ops"))
            .node(BOB, NodeBuilder::new("bob-desk").login("bob@example.com"))
            .node(
                CAROL,
                NodeBuilder::new("carol-desk").login("carol@example.com"),
            )
            .api_key("ops", OPS_KEY)
            .api_key("review-bot", REVIEW_KEY)
            .litellm("")
            .coder()
            .coder_session("sess-alice-0123", "usr-alice", "alice")
            .coder_session("sess-bob-4567", "usr-bob", "bob")
            .env("BOTCREDS_PROVISIONER_SECRET", SECRET)
            .toml(&format!(
                "[admin]\nusers = [\"alice@example.com\", \"bob@example.com\"]\n\
             tags = [\"tag:ops\"]\napi_key_bots = [\"ops\"]\n\n[tls]\nlisten = [\"127.0.0.1:0\"]\n\
             server_names = [\"localhost\", \"127.0.0.1\"]\nclient_cert_ttl = \"1h\"\n\n{limits}\n"
            ))
    }

    pub enum Body {
        None,
        Json(Value),
        /// A content type (or none) and raw bytes.
        Raw(Option<&'static str>, Vec<u8>),
    }

    /// One HTTP request as an attacker sends it.
    pub struct Req {
        pub from: &'static str,
        pub method: &'static str,
        pub path: String,
        pub headers: Vec<(&'static str, String)>,
        pub body: Body,
    }

    pub fn req(from: &'static str, method: &'static str, path: impl Into<String>) -> Req {
        Req {
            from,
            method,
            path: path.into(),
            headers: Vec::new(),
            body: Body::None,
        }
    }

    impl Req {
        pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Req {
            self.headers.push((name, value.into()));
            self
        }
        pub fn json(mut self, body: Value) -> Req {
            self.body = Body::Json(body);
            self
        }
        pub fn raw(mut self, content_type: Option<&'static str>, body: impl Into<Vec<u8>>) -> Req {
            self.body = Body::Raw(content_type, body.into());
            self
        }
    }

    /// How a refusal must look.
    #[derive(Clone, Copy, Debug)]
    pub enum Expect {
        /// The broker's JSON error with this code (and its status).
        Api(ErrorCode),
        /// The key-provisioner API's `{"error": "<code in words>"}` with the code's status.
        Seed(ErrorCode),
        /// An HTML page with this status naming the code.
        Page(ErrorCode),
        /// Just this status (a page that shows and changes nothing).
        Status(u16),
    }

    pub fn client(from: &str) -> reqwest::Client {
        reqwest::Client::builder()
            .local_address(ip(from))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    }

    pub async fn send<B: Broker>(w: &World<B>, r: &Req) -> (u16, String) {
        let method = reqwest::Method::from_bytes(r.method.as_bytes()).unwrap();
        let mut b = client(r.from).request(method, format!("{}{}", w.broker.url(), r.path));
        for (k, v) in &r.headers {
            b = b.header(*k, v.as_str());
        }
        b = match &r.body {
            Body::None => b,
            Body::Json(v) => b.json(v),
            Body::Raw(ct, bytes) => {
                let b = match ct {
                    Some(ct) => b.header("content-type", *ct),
                    None => b,
                };
                b.body(bytes.clone())
            }
        };
        let resp = b.send().await.expect("the broker answers");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    pub fn check(name: &str, expect: Expect, status: u16, text: &str) {
        match expect {
            Expect::Api(code) => {
                assert_eq!(status, code.http_status(), "{name}: {text}");
                let body: ErrorBody = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("{name}: not an error body ({e}): {text}"));
                assert_eq!(body.code, code, "{name}: {text}");
            }
            Expect::Seed(code) => {
                assert_eq!(status, code.http_status(), "{name}: {text}");
                let body: Value = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {text}"));
                assert_eq!(
                    body["error"].as_str(),
                    Some(code.as_str().replace('_', " ").as_str()),
                    "{name}: {text}"
                );
            }
            Expect::Page(code) => {
                assert_eq!(status, code.http_status(), "{name}: {text}");
                assert!(text.contains(code.as_str()), "{name}: {text}");
            }
            Expect::Status(s) => assert_eq!(status, s, "{name}: {text}"),
        }
    }

    /// What no refusal may change.
    #[derive(Debug, PartialEq)]
    pub struct Stored {
        pub pending: Vec<String>,
        pub grants: Value,
        pub remembered: Value,
        pub mints: u64,
        pub litellm_keys: Vec<String>,
        pub litellm_generates: usize,
        pub certs: Value,
    }

    pub async fn ops_get<B: Broker>(w: &World<B>, path: &str) -> Value {
        let resp = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("{}{path}", w.broker.url()))
            .bearer_auth(OPS_KEY)
            .send()
            .await
            .expect("the broker answers");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.expect("JSON");
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    pub async fn stored<B: Broker>(w: &World<B>) -> Stored {
        let pending = ops_get(w, "/v1/admin/approvals").await;
        let policy = ops_get(w, "/v1/admin/policy").await;
        let mut litellm_keys: Vec<String> = w
            .litellm
            .live_keys()
            .into_iter()
            .map(|k| format!("{:?}", k.key_alias))
            .collect();
        litellm_keys.sort();
        Stored {
            pending: pending["requests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["request_id"].as_str().unwrap().to_string())
                .collect(),
            grants: ops_get(w, "/v1/admin/grants?all=true").await["grants"].clone(),
            remembered: policy["remembered"].clone(),
            mints: w.github.mint_count(),
            litellm_keys,
            litellm_generates: w.litellm.calls_to("/key/generate").len(),
            certs: ops_get(w, "/v1/certs").await["certificates"].clone(),
        }
    }

    pub async fn audit<B: Broker>(w: &World<B>) -> Vec<AuditEvent> {
        serde_json::from_value::<AuditList>(ops_get(w, "/v1/admin/audit?limit=10000").await)
            .unwrap()
            .events
    }

    /// The audit events a refusal may add.
    pub const REFUSAL_EVENTS: &[AuditEventKind] = &[
        AuditEventKind::CredentialRequested,
        AuditEventKind::CredentialDenied,
        AuditEventKind::ApprovalRefused,
        AuditEventKind::CertRefused,
    ];

    /// One row: what is sent and how it must be refused.
    pub struct Row {
        pub name: String,
        pub req: Req,
        pub expect: Expect,
    }

    pub fn row(name: impl Into<String>, req: Req, expect: Expect) -> Row {
        Row {
            name: name.into(),
            req,
            expect,
        }
    }

    /// Sends every row and checks its answer, that nothing stored changed, and that the audit log
    /// grew by refusals only. Answers how many rows ran.
    pub async fn run_table<B: Broker>(w: &World<B>, rows: Vec<Row>) -> usize {
        let n = rows.len();
        for r in rows {
            let before = stored(w).await;
            let audit_len = audit(w).await.len();
            let (status, text) = send(w, &r.req).await;
            check(&r.name, r.expect, status, &text);
            assert_refusal_only(w, &r.name, &before, audit_len).await;
        }
        n
    }

    pub async fn assert_refusal_only<B: Broker>(
        w: &World<B>,
        name: &str,
        before: &Stored,
        audit_len: usize,
    ) {
        let after = stored(w).await;
        assert_eq!(&after, before, "{name}: stored state changed");
        let added: Vec<AuditEventKind> = audit(w).await[audit_len..]
            .iter()
            .map(|e| e.event)
            .collect();
        assert!(
            added.iter().all(|k| REFUSAL_EVENTS.contains(k)),
            "{name}: the audit log grew by more than refusals: {added:?}"
        );
    }

    pub fn credential_request(repos: &[&str], perms: &[&str]) -> Value {
        json!({"kind": "github_token", "repositories": repos, "permissions": perms})
    }

    /// A pending approval request of ci-bot (write on acme-corp/web), for the rows that try to
    /// decide it.
    pub async fn pending_request<B: Broker>(w: &World<B>) -> String {
        let (s, text) = send(
            w,
            &req(CI, "POST", "/v1/credentials")
                .json(credential_request(&["acme-corp/web"], &["contents:write"])),
        )
        .await;
        assert_eq!(s, 202, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        v["request_id"].as_str().unwrap().to_string()
    }
}

/// `security_keys` and `api::keys`: attacks on other holders' LiteLLM keys.
pub mod keys {
    use serde_json::{Value, json};

    use crate::fake_tailscaled::NodeBuilder;
    use crate::world::{World, WorldBuilder};

    /// Two bot names that share their first 60 characters.
    pub const LONG_ONE: &str = "build-farm-worker-with-a-very-long-descriptive-name-region-x-1";
    pub const LONG_TWO: &str = "build-farm-worker-with-a-very-long-descriptive-name-region-x-2";

    pub fn policy() -> String {
        format!(
            r#"
bots:
  ws-a:
    identity: {{ type: api_key }}
    auto_approve: [{{ litellm_scope: workspace }}, {{ litellm_scope: "agent:review" }}]
  ws-b:
    identity: {{ type: api_key }}
    auto_approve: [{{ litellm_scope: workspace }}, {{ litellm_scope: "agent:review" }}]
  tag-bot:
    identity: {{ tag: "tag:ci" }}
    auto_approve: [{{ litellm_scope: "agent:review" }}]
  {LONG_ONE}:
    identity: {{ type: api_key }}
    auto_approve: [{{ litellm_scope: "agent:review" }}]
  {LONG_TWO}:
    identity: {{ type: api_key }}
    auto_approve: [{{ litellm_scope: "agent:review" }}]
  ops:
    identity: {{ type: api_key }}
defaults:
  requires_approval: true
"#
        )
    }

    pub const A_KEY: &str = "bck_secWsAKey0123456789abcdefghijklm";
    pub const B_KEY: &str = "bck_secWsBKey0123456789abcdefghijklm";
    pub const TAG_BOT_KEY: &str = "bck_secTagBotKey0123456789abcdefghij";
    pub const LONG_ONE_KEY: &str = "bck_secLongOneKey0123456789abcdefghi";
    pub const LONG_TWO_KEY: &str = "bck_secLongTwoKey0123456789abcdefghi";
    pub const OPS_KEY: &str = "bck_secOpsKey0123456789abcdefghijklm";
    pub const SECRET: &str = "provisioner-secret-sec-0123456789";
    /// An untagged tailnet node that matches no bot but is named like `ws-a`.
    pub const IMPOSTOR: &str = "127.0.0.5";
    pub const TAGGED: &str = "127.0.0.4";

    /// ws-a, ws-b, tag-bot (tag and API key), the two long names and `ops` by API key; an
    /// impostor node named `ws-a` and a tagged node; LiteLLM with Coder and the provisioner secret.
    pub fn setup() -> WorldBuilder {
        World::builder(&policy())
            .node(
                IMPOSTOR,
                NodeBuilder::new("ws-a").login("mallory@example.com"),
            )
            .node(TAGGED, NodeBuilder::new("ci-runner").tags(["tag:ci"]))
            .api_key("ws-a", A_KEY)
            .api_key("ws-b", B_KEY)
            // An API key for a bot whose policy identity is a tag: never a way in.
            .api_key("tag-bot", TAG_BOT_KEY)
            .api_key(LONG_ONE, LONG_ONE_KEY)
            .api_key(LONG_TWO, LONG_TWO_KEY)
            .api_key("ops", OPS_KEY)
            .litellm("")
            .coder()
            .toml("[admin]\napi_key_bots = [\"ops\"]\n")
            .env("BOTCREDS_PROVISIONER_SECRET", SECRET)
            .coder_session("coder-session-dev-0123456789", "usr-dev", "dev")
    }

    pub fn ws(id: &str, name: &str, user: &str) -> Value {
        json!({"workspace_id": id, "workspace_name": name, "coder_user": user, "coder_user_id": format!("usr-{user}")})
    }

    /// The code (or, on the provisioner API, the error in words) of an error answer.
    pub fn error_of(body: &Value) -> String {
        body.get("code")
            .or_else(|| body.get("error"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }
}
