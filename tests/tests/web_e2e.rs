//! End-to-end: the approval web page in a real headless Chromium (driven over WebDriver), and
//! the notifications the same decisions send — signed webhooks to a receiver that verifies
//! them, and the Slack card. Also the page's refusals of forged, cross-site and replayed forms,
//! sent directly over HTTP.
//!
//! The browser always connects from 127.0.0.1; the fake tailscaled says who that is (an admin
//! in one world, a non-admin in another). Bots and other admins use other loopback addresses.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use botcreds_proto::approval::WebhookEvent;
use botcreds_proto::{ApprovalRequestView, GithubCredential};
use botcreds_tests::fake_tailscaled::NodeBuilder;
use botcreds_tests::webdriver::ChromeDriver;
use botcreds_tests::webhook_sink::WebhookSink;
use botcreds_tests::world::{World, ip};
use serde_json::{Value, json};

const POLICY: &str = r#"
bots:
  ci-bot:
    identity: { tag: "tag:ci" }
    auto_approve:
      - repo: "acme-corp/web"
        permissions: [contents:read]
    requires_approval:
      - repo: "acme-corp/*"
  hasty-bot:
    identity: { tag: "tag:hasty" }
    approval_timeout: 1s
    requires_approval:
      - repo: "acme-corp/*"
defaults:
  requires_approval: true
  approval_timeout: 1h
"#;

/// Where the browser connects from.
const BROWSER: &str = "127.0.0.1";
const CI: &str = "127.0.0.2";
const BOB: &str = "127.0.0.4";
const CAROL: &str = "127.0.0.6";
const HASTY: &str = "127.0.0.7";
const WEBHOOK_SECRET: &str = "e2e-webhook-secret-0123456789";
const SLACK_TOKEN: &str = "slackTOKENdoNotLog42";
const PUBLIC_URL: &str = "http://botcreds.example.ts.net:8443";

/// The world and the two notification receivers.
struct WebWorld {
    world: World,
    hooks: WebhookSink,
    slack: WebhookSink,
}

impl std::ops::Deref for WebWorld {
    type Target = World;
    fn deref(&self) -> &World {
        &self.world
    }
}

impl std::ops::DerefMut for WebWorld {
    fn deref_mut(&mut self) -> &mut World {
        &mut self.world
    }
}

/// A broker whose browser address (127.0.0.1) is `browser_login`'s laptop; alice and carol
/// are admins, bob is not.
async fn world(browser_login: &str) -> WebWorld {
    let hooks = WebhookSink::start(Some(WEBHOOK_SECRET)).await;
    let slack = WebhookSink::start(None).await;
    let toml = format!(
        r#"
[admin]
users = ["alice@example.com", "carol@example.com"]

[web]
public_url = "{PUBLIC_URL}"

[notify]
retry_initial = "1s"
retry_max = "2s"

[[notify.webhooks]]
name = "e2e"
url = "{hook}"
secret_env = "BOTCREDS_TEST_WEBHOOK_SECRET"

[notify.slack]
webhook_url_env = "BOTCREDS_TEST_SLACK_URL"
"#,
        hook = hooks.url(),
    );
    let world = World::builder(POLICY)
        .node(
            BROWSER,
            NodeBuilder::new("browser-laptop").login(browser_login),
        )
        .node(CI, NodeBuilder::new("ci-bot-07").tags(["tag:ci"]))
        .node(BOB, NodeBuilder::new("bob-laptop").login("bob@example.com"))
        .node(
            CAROL,
            NodeBuilder::new("carol-laptop").login("carol@example.com"),
        )
        .node(HASTY, NodeBuilder::new("hasty-01").tags(["tag:hasty"]))
        .toml(&toml)
        .env("BOTCREDS_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .env(
            "BOTCREDS_TEST_SLACK_URL",
            &format!("{}/services/T0/B0/{SLACK_TOKEN}", slack.url()),
        )
        .start()
        .await;
    WebWorld {
        world,
        hooks,
        slack,
    }
}

fn ask_body(wait: Option<&str>) -> Value {
    let mut body = json!({
        "kind": "github_token",
        "repositories": ["acme-corp/web"],
        "permissions": ["contents:write"],
        "reason": "ship <the> \"fix\" & more",
    });
    if let Some(w) = wait {
        body["wait"] = json!(w);
    }
    body
}

/// A pending approval request of ci-bot (no wait): its id.
async fn pending_request(w: &World) -> String {
    let resp = w
        .broker
        .client_from(ip(CI))
        .post(format!("{}/v1/credentials", w.broker.url))
        .json(&ask_body(None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let view: ApprovalRequestView = resp.json().await.unwrap();
    view.request_id
}

/// GET a page as `from`: status and HTML.
async fn page(w: &World, from: &str, path: &str) -> (u16, String) {
    let resp = w
        .broker
        .client_from(ip(from))
        .get(format!("{}{path}", w.broker.url))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// The form token on a detail page.
fn csrf_of(html: &str) -> String {
    let start = html.find("name=\"csrf\" value=\"").expect("a form token") + 19;
    html[start..]
        .split('"')
        .next()
        .expect("token value")
        .to_string()
}

/// The state the detail page shows.
async fn state_on_page(w: &World, id: &str) -> String {
    let (status, html) = page(w, BROWSER, &format!("/approvals/{id}")).await;
    assert_eq!(status, 200, "{html}");
    let start = html.find("id=\"state\">").expect("state cell") + 11;
    html[start..].split('<').next().unwrap().to_string()
}

/// POST a form as `from` with extra headers: status and body.
async fn post_form(
    w: &World,
    from: &str,
    path: &str,
    form: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    // Redirects are not followed, so a decision's 303 shows.
    let client = reqwest::Client::builder()
        .local_address(ip(from))
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut req = client
        .post(format!("{}{path}", w.broker.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

fn same_origin(w: &World) -> [(&'static str, String); 2] {
    [
        ("origin", w.broker.url.clone()),
        ("sec-fetch-site", "same-origin".to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_approves_in_chromium_and_the_waiting_bot_gets_its_token() {
    let mut w = world("alice@example.com").await;
    // The first webhook delivery fails once: the notifier must retry it.
    w.hooks.fail_next(1, 503);
    let driver = ChromeDriver::start().await;
    let browser = driver.session().await;
    browser
        .set_implicit_wait(Duration::from_secs(15))
        .await
        .unwrap();

    // The bot asks and waits for a human.
    let bot = w.broker.client_from(ip(CI));
    let url = format!("{}/v1/credentials", w.broker.url);
    let waiting = tokio::spawn(async move {
        let resp = bot
            .post(url)
            .json(&ask_body(Some("25s")))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().await.unwrap())
    });

    // The signed approval_requested event names the request (after one retry).
    assert!(
        w.hooks
            .wait_for("approval_requested", 1, Duration::from_secs(20))
            .await,
        "no approval_requested webhook; log:\n{}",
        w.broker.logs()
    );
    let requested = w.hooks.delivered("approval_requested").remove(0);
    let event: WebhookEvent = serde_json::from_slice(&requested.body).unwrap();
    let id = event.request.request_id.clone();
    assert_eq!(event.event, "approval_requested");
    assert_eq!(
        event.approval_url.as_deref(),
        Some(&*format!("{PUBLIC_URL}/approvals/{id}"))
    );

    // The admin opens the list, sees the request with its reason, and opens it.
    browser
        .goto(&format!("{}/approvals", w.broker.url))
        .await
        .unwrap();
    assert_eq!(
        browser.title().await.unwrap(),
        "Pending approvals · botcreds"
    );
    let row = browser
        .find(&format!("tr[data-request-id=\"{id}\"]"))
        .await
        .expect("the request is listed");
    let row_text = browser.text(&row).await.unwrap();
    assert!(row_text.contains("ci-bot"), "{row_text}");
    assert!(row_text.contains("ship <the> \"fix\" & more"), "{row_text}");
    assert!(row_text.contains("just now") || row_text.contains("minute"));
    let link = browser
        .find(&format!("tr[data-request-id=\"{id}\"] a.request"))
        .await
        .unwrap();
    browser.click(&link).await.unwrap();
    let state = browser.find("#state").await.unwrap();
    assert_eq!(browser.text(&state).await.unwrap(), "PENDING");

    // Approve.
    let approve = browser.find("#approve").await.unwrap();
    browser.click(&approve).await.unwrap();
    let decided = browser
        .find("#decided")
        .await
        .expect("the page shows the decision");
    assert!(
        browser
            .text(&decided)
            .await
            .unwrap()
            .contains("has been decided")
    );
    let state = browser.find("#state").await.unwrap();
    let state = browser.text(&state).await.unwrap();
    assert!(state == "APPROVED" || state == "ISSUED", "{state}");
    assert!(
        browser
            .current_url()
            .await
            .unwrap()
            .ends_with(&format!("/approvals/{id}"))
    );

    // The waiting bot holds a real token.
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, 200, "{body}");
    let cred: GithubCredential = serde_json::from_value(body).unwrap();
    assert!(cred.token.starts_with("ghs_"));
    assert_eq!(cred.approval, "manual");
    let info = w.github.token_info(&cred.token).expect("GitHub issued it");
    assert!(info.allows("acme-corp/web", "contents", "write"));

    // Signed requested + granted events; the retry kept its delivery id.
    assert!(
        w.hooks
            .wait_for("approval_granted", 1, Duration::from_secs(10))
            .await
    );
    let all = w.hooks.received();
    assert!(all.iter().all(|r| r.signature_ok), "{all:?}");
    assert!(
        all.iter()
            .all(|r| r.method == "POST" && r.content_type.as_deref() == Some("application/json"))
    );
    let requested_attempts: Vec<_> = all
        .iter()
        .filter(|r| r.event.as_deref() == Some("approval_requested"))
        .collect();
    assert_eq!(requested_attempts.len(), 2);
    assert_eq!(requested_attempts[0].answered, 503);
    assert_eq!(
        requested_attempts[0].delivery,
        requested_attempts[1].delivery
    );
    assert_eq!(requested_attempts[0].body, requested_attempts[1].body);
    let granted: WebhookEvent =
        serde_json::from_slice(&w.hooks.delivered("approval_granted")[0].body).unwrap();
    assert_eq!(granted.request.request_id, id);
    assert_eq!(
        granted.request.decided_by.as_deref(),
        Some("tailnet:alice@example.com")
    );
    assert_ne!(granted.delivery_id, event.delivery_id);

    // The Slack card: seed layout, link buttons to the page.
    assert!(
        w.slack
            .wait_for("approval_requested", 1, Duration::from_secs(10))
            .await
    );
    let slack_requested = w.slack.delivered("approval_requested").remove(0);
    assert!(slack_requested.path.ends_with(SLACK_TOKEN));
    let card = slack_requested.json.expect("JSON card");
    assert_eq!(
        card["blocks"][0]["text"]["text"],
        format!("🔐 Credential Request #{id}")
    );
    let buttons = card["blocks"][4]["elements"].as_array().unwrap();
    let urls: Vec<&str> = buttons.iter().map(|b| b["url"].as_str().unwrap()).collect();
    assert_eq!(
        urls,
        [
            format!("{PUBLIC_URL}/approvals/{id}?action=approve"),
            format!("{PUBLIC_URL}/approvals/{id}?action=remember"),
            format!("{PUBLIC_URL}/approvals/{id}?action=deny"),
        ]
    );

    // Logged and counted; no secret in the log.
    assert!(
        w.broker
            .wait_for_log("notification delivered", Duration::from_secs(5))
            .await
    );
    let logs = w.broker.logs();
    assert!(
        logs.contains("notification attempt failed; retrying"),
        "{logs}"
    );
    assert!(!logs.contains(WEBHOOK_SECRET) && !logs.contains(SLACK_TOKEN));
    assert!(!logs.contains(&cred.token));
    let metrics = reqwest::get(format!("{}/metrics", w.broker.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("botcreds_notify_deliveries_total{channel=\"webhook\",target=\"e2e\",event=\"approval_requested\",outcome=\"retried\"} 1"),
        "{metrics}"
    );

    // The audit page shows the decision.
    browser
        .goto(&format!("{}/audit", w.broker.url))
        .await
        .unwrap();
    let audit = browser.find("#audit").await.unwrap();
    let audit_text = browser.text(&audit).await.unwrap();
    assert!(audit_text.contains("approval_granted"), "{audit_text}");
    assert!(audit_text.contains(&id));
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_non_admin_node_sees_403_in_chromium() {
    let w = world("bob@example.com").await;
    let id = pending_request(&w).await;
    let driver = ChromeDriver::start().await;
    let browser = driver.session().await;
    for path in [
        "/approvals".to_string(),
        format!("/approvals/{id}"),
        "/audit".into(),
    ] {
        browser
            .goto(&format!("{}{path}", w.broker.url))
            .await
            .unwrap();
        assert_eq!(browser.title().await.unwrap(), "Forbidden · botcreds");
        let code = browser.find("#error-code").await.unwrap();
        assert_eq!(browser.text(&code).await.unwrap(), "forbidden");
        let source = browser.source().await.unwrap();
        assert!(!source.contains(&id), "a non-admin must not see requests");
        // The same page over plain HTTP is a 403.
        let (status, _) = page(&w, BROWSER, &path).await;
        assert_eq!(status, 403);
    }
    browser.close().await;
    // Nothing changed: an admin still sees it pending.
    let (status, html) = page(&w, CAROL, &format!("/approvals/{id}")).await;
    assert_eq!(status, 200);
    assert!(html.contains("id=\"state\">PENDING<"));
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_cross_site_foreign_and_replayed_forms_change_nothing() {
    let w = world("alice@example.com").await;
    let id = pending_request(&w).await;
    let (status, html) = page(&w, BROWSER, &format!("/approvals/{id}")).await;
    assert_eq!(status, 200);
    let alice_token = csrf_of(&html);
    let (_, carol_html) = page(&w, CAROL, &format!("/approvals/{id}")).await;
    let carol_token = csrf_of(&carol_html);
    assert_ne!(alice_token, carol_token);
    let approve = format!("/approvals/{id}/approve");
    let deny = format!("/approvals/{id}/deny");
    let good = same_origin(&w);
    let good: Vec<(&str, &str)> = good.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let with_token = |t: &str| format!("csrf={t}&bot=ci-bot");

    // (what, form body, headers, from, status)
    type Refusal<'a> = (&'a str, String, Vec<(&'a str, &'a str)>, &'a str, u16);
    let refusals: Vec<Refusal> = vec![
        // A page on another site posting to us.
        (
            "foreign origin",
            with_token(&alice_token),
            vec![("origin", "https://evil.example")],
            BROWSER,
            403,
        ),
        (
            "cross-site fetch",
            with_token(&alice_token),
            vec![("sec-fetch-site", "cross-site")],
            BROWSER,
            403,
        ),
        (
            "same-site, other origin",
            with_token(&alice_token),
            vec![("sec-fetch-site", "same-site")],
            BROWSER,
            403,
        ),
        ("no token", "bot=ci-bot".into(), good.clone(), BROWSER, 403),
        (
            "wrong token",
            with_token("v1.1790000000.00ff"),
            good.clone(),
            BROWSER,
            403,
        ),
        (
            "another admin's token",
            with_token(&carol_token),
            good.clone(),
            BROWSER,
            403,
        ),
        (
            "a non-admin with an admin's token",
            with_token(&alice_token),
            good.clone(),
            BOB,
            403,
        ),
        // DNS rebinding: another site's name pointed at the broker; same-origin to the browser.
        (
            "a rebound host name",
            with_token(&alice_token),
            vec![
                ("host", "evil.example:8443"),
                ("origin", "http://evil.example:8443"),
                ("sec-fetch-site", "same-origin"),
            ],
            BROWSER,
            403,
        ),
        (
            "the wrong bot",
            format!("csrf={alice_token}&bot=other-bot"),
            good.clone(),
            BROWSER,
            409,
        ),
    ];
    for (what, form, headers, from, want) in refusals {
        for path in [&approve, &deny] {
            let (status, body) = post_form(&w, from, path, &form, &headers).await;
            assert_eq!(status, want, "{what} on {path}: {body}");
            assert!(body.contains("<h1>"), "{what}: an HTML error page");
        }
        assert_eq!(state_on_page(&w, &id).await, "PENDING", "{what}");
    }

    // A JSON body is not a form; a 100 KB reason is refused before anything happens; a 5 KB
    // one by the deny rules.
    let resp = w
        .broker
        .client_from(ip(BROWSER))
        .post(format!("{}{deny}", w.broker.url))
        .header("content-type", "application/json")
        .body(format!("{{\"csrf\":\"{alice_token}\"}}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 415);
    let huge = format!("csrf={alice_token}&reason={}", "x".repeat(100 * 1024));
    let (status, body) = post_form(&w, BROWSER, &deny, &huge, &good).await;
    assert_eq!(status, 413, "{body}");
    let long = format!("csrf={alice_token}&reason={}", "x".repeat(5 * 1024));
    let (status, body) = post_form(&w, BROWSER, &deny, &long, &good).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_deny_reason"), "{body}");
    assert_eq!(state_on_page(&w, &id).await, "PENDING");

    // The real form works: deny with a multi-line reason (browsers send CRLF).
    let form = format!("{}&reason=not+today%0D%0Asorry", with_token(&alice_token));
    let (status, body) = post_form(&w, BROWSER, &deny, &form, &good).await;
    assert_eq!(status, 303, "{body}");
    let (_, html) = page(&w, BROWSER, &format!("/approvals/{id}")).await;
    assert!(html.contains("id=\"state\">DENIED<"), "{html}");
    assert!(html.contains("not today\nsorry"));

    // Replaying the same (still fresh) token changes nothing: the request is decided.
    for path in [&approve, &deny] {
        let (status, body) = post_form(&w, BROWSER, path, &with_token(&alice_token), &good).await;
        assert_eq!(status, 409, "{body}");
        assert!(body.contains("already_decided"), "{body}");
    }
    assert_eq!(state_on_page(&w, &id).await, "DENIED");
    // The decided page offers no form.
    let (_, html) = page(&w, BROWSER, &format!("/approvals/{id}")).await;
    assert!(!html.contains("<form"));
    assert!(
        w.hooks
            .wait_for("approval_denied", 1, Duration::from_secs(10))
            .await
    );
    assert_eq!(w.hooks.delivered("approval_granted").len(), 0);

    // Approve + Remember on another request: approved, and a remembered rule is shown.
    let resp = w
        .broker
        .client_from(ip(CI))
        .post(format!("{}/v1/credentials", w.broker.url))
        .json(&json!({
            "kind": "github_token",
            "repositories": ["acme-corp/docs"],
            "permissions": ["issues:write"],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let second = resp.json::<ApprovalRequestView>().await.unwrap().request_id;
    let (_, html) = page(&w, BROWSER, &format!("/approvals/{second}?action=remember")).await;
    assert!(html.contains("id=\"remember\" class=\"approve suggested\" autofocus=\"autofocus\""));
    let form = format!("csrf={}&bot=ci-bot&remember=1", csrf_of(&html));
    let (status, body) = post_form(
        &w,
        BROWSER,
        &format!("/approvals/{second}/approve"),
        &form,
        &good,
    )
    .await;
    assert_eq!(status, 303, "{body}");
    let (_, html) = page(&w, BROWSER, &format!("/approvals/{second}")).await;
    assert!(html.contains("id=\"state\">APPROVED<"), "{html}");
    assert!(html.contains("<th>Remembered rule</th><td>rem_"), "{html}");

    // Pages are not served under a foreign (rebound) host name either.
    let resp = w
        .broker
        .client_from(ip(BROWSER))
        .get(format!("{}/approvals/{id}", w.broker.url))
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    let html = resp.text().await.unwrap();
    assert!(
        html.contains("own names") && !html.contains("csrf"),
        "{html}"
    );

    // An unknown id is a 404 page, and pages carry their security headers.
    let resp = w
        .broker
        .client_from(ip(BROWSER))
        .get(format!("{}/approvals/apr_nosuch00", w.broker.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let h = resp.headers();
    assert!(
        h["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'none'")
    );
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unanswered_request_expires_and_every_channel_hears_of_it() {
    let w = world("alice@example.com").await;
    let resp = w
        .broker
        .client_from(ip(HASTY))
        .post(format!("{}/v1/credentials", w.broker.url))
        .json(&ask_body(None))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let id = resp.json::<ApprovalRequestView>().await.unwrap().request_id;
    // hasty-bot's approval_timeout is 1s; the sweeper expires it and the notifier tells.
    assert!(
        w.hooks
            .wait_for("approval_expired", 1, Duration::from_secs(20))
            .await,
        "no approval_expired webhook; log:\n{}",
        w.broker.logs()
    );
    let expired = w.hooks.delivered("approval_expired").remove(0);
    assert!(expired.signature_ok);
    let event: WebhookEvent = serde_json::from_slice(&expired.body).unwrap();
    assert_eq!(event.request.request_id, id);
    assert_eq!(event.request.state.as_str(), "EXPIRED");
    assert!(
        w.slack
            .wait_for("approval_expired", 1, Duration::from_secs(10))
            .await
    );
    let card = w
        .slack
        .delivered("approval_expired")
        .remove(0)
        .json
        .unwrap();
    let text = card["text"].as_str().unwrap();
    assert!(
        text.starts_with(&format!("⌛ Credential request #{id} (hasty-bot")),
        "{text}"
    );
    assert_eq!(
        card["blocks"][1]["elements"][0]["url"],
        format!("{PUBLIC_URL}/approvals/{id}")
    );
    // The page shows it expired, without forms.
    let (status, html) = page(&w, BROWSER, &format!("/approvals/{id}")).await;
    assert_eq!(status, 200);
    assert!(html.contains("id=\"state\">EXPIRED<"), "{html}");
    assert!(!html.contains("<form"));
}
