//! The chat message: a Slack-compatible incoming-webhook payload (Block Kit, with a plain `text`
//! fallback) laid out like the seed's card — request id, bot, repo or scope, permissions, reason,
//! age — with link buttons Approve / Approve + Remember / Deny that open the approval page.
//! The buttons only link: every decision is taken on the page, by an identified admin.

use botcreds_proto::audit::AuditEventKind;
use botcreds_proto::{ApprovalRequestView, ApprovalResource};
use serde_json::{Value, json};
use time::OffsetDateTime;

/// Slack's limit for one section field is 2000 characters; stay clear of it.
const MAX_FIELD_CHARS: usize = 1500;
/// A reason is the bot's free text; the card shows its start.
const MAX_REASON_CHARS: usize = 500;

/// The `?action=` each button adds, which the page uses to put that button forward.
pub const ACTION_APPROVE: &str = "approve";
pub const ACTION_REMEMBER: &str = "remember";
pub const ACTION_DENY: &str = "deny";

/// The message for `kind` about `request`; `page` is the request's approval page
/// (`{public_url}/approvals/{id}`).
pub fn message(
    kind: AuditEventKind,
    request: &ApprovalRequestView,
    actor: Option<&str>,
    page: &str,
    now: OffsetDateTime,
) -> Value {
    let id = &request.request_id;
    let bot = request.bot.as_deref().unwrap_or("(no policy bot)");
    match kind {
        AuditEventKind::ApprovalRequested => requested(request, bot, page, now),
        _ => {
            let (icon, verb) = match kind {
                AuditEventKind::ApprovalGranted => ("✅", "approved"),
                AuditEventKind::ApprovalDenied => ("⛔", "denied"),
                _ => ("⌛", "expired"),
            };
            let by = match (kind, actor.or(request.decided_by.as_deref())) {
                (AuditEventKind::ApprovalExpired, _) | (_, None) => String::new(),
                (_, Some(actor)) => format!(" by {}", escape(actor)),
            };
            let mut line = format!(
                "{icon} Credential request #{} ({}, {}) {verb}{by}",
                escape(id),
                escape(bot),
                escape(&truncate(&request.resource.summary(), MAX_FIELD_CHARS)),
            );
            if let (AuditEventKind::ApprovalDenied, Some(reason)) = (kind, &request.deny_reason) {
                line.push_str(&format!(
                    ": \"{}\"",
                    escape(&truncate(reason, MAX_REASON_CHARS))
                ));
            }
            json!({
                "text": line,
                "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn", "text": line}},
                    {"type": "actions", "elements": [
                        button("View", page, "view", None),
                    ]},
                ],
            })
        }
    }
}

fn requested(request: &ApprovalRequestView, bot: &str, page: &str, now: OffsetDateTime) -> Value {
    let id = &request.request_id;
    let age = age_words(&request.created_at, now);
    let mut fields = vec![field("Bot", bot)];
    match &request.resource {
        ApprovalResource::GithubToken {
            repositories,
            permissions,
        } => {
            let label = if repositories.len() == 1 {
                "Repo"
            } else {
                "Repos"
            };
            fields.push(field(label, &repositories.join(", ")));
            fields.push(field("Permissions", &permissions.join(", ")));
        }
        ApprovalResource::LitellmKey { .. } => {
            fields.push(field("Scope", &request.resource.summary()));
        }
        ApprovalResource::DeployKey {
            repository,
            permission,
        } => {
            fields.push(field("Deploy key", repository));
            fields.push(field("Permissions", permission));
        }
    }
    fields.push(field("Requested", &age));
    let reason = match &request.reason {
        Some(r) => format!("*Reason:* \"{}\"", escape(&truncate(r, MAX_REASON_CHARS))),
        None => "*Reason:* _none given_".to_string(),
    };
    let title = format!("🔐 Credential Request #{id}");
    let fallback = format!(
        "{title}: {} asks for {} ({age})",
        escape(bot),
        escape(&truncate(&request.resource.summary(), MAX_FIELD_CHARS))
    );
    json!({
        "text": fallback,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": truncate(&title, 150), "emoji": true}},
            {"type": "section", "fields": fields},
            {"type": "section", "text": {"type": "mrkdwn", "text": reason}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": format!(
                "{} · rule `{}` · expires {}",
                escape(&request.caller), escape(&request.rule), escape(&request.expires_at)
            )}]},
            {"type": "actions", "elements": [
                button("Approve", &with_action(page, ACTION_APPROVE), "approve", Some("primary")),
                button("Approve + Remember", &with_action(page, ACTION_REMEMBER), "approve_remember", None),
                button("Deny", &with_action(page, ACTION_DENY), "deny", Some("danger")),
            ]},
        ],
    })
}

fn with_action(page: &str, action: &str) -> String {
    format!("{page}?action={action}")
}

fn field(label: &str, value: &str) -> Value {
    json!({"type": "mrkdwn", "text": format!("*{label}:*\n{}", escape(&truncate(value, MAX_FIELD_CHARS)))})
}

fn button(text: &str, url: &str, action_id: &str, style: Option<&str>) -> Value {
    let mut b = json!({
        "type": "button",
        "text": {"type": "plain_text", "text": text},
        "url": url,
        "action_id": action_id,
    });
    if let Some(style) = style {
        b["style"] = json!(style);
    }
    b
}

/// Slack's mrkdwn escaping: `&`, `<` and `>` (so `<!channel>` or a forged link in a bot's
/// reason stays text).
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// At most `max` characters, with an ellipsis when cut.
pub fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// "just now", "2 minutes ago", "3 hours ago", "2 days ago": how long ago an RFC 3339 time was.
pub fn age_words(rfc3339: &str, now: OffsetDateTime) -> String {
    let Ok(then) = OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
    else {
        return rfc3339.to_string();
    };
    let secs = (now - then).whole_seconds();
    let plural = |n: i64, unit: &str| {
        if n == 1 {
            format!("1 {unit} ago")
        } else {
            format!("{n} {unit}s ago")
        }
    };
    match secs {
        i64::MIN..60 => "just now".to_string(),
        60..3600 => plural(secs / 60, "minute"),
        3600..86_400 => plural(secs / 3600, "hour"),
        _ => plural(secs / 86_400, "day"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botcreds_proto::ApprovalState;
    use time::macros::datetime;

    pub(crate) fn view() -> ApprovalRequestView {
        ApprovalRequestView {
            request_id: "apr_a3f2b7c9".into(),
            state: ApprovalState::Pending,
            bot: Some("slopcannon-bot".into()),
            caller: "tailnet:slop-01 (nStable)".into(),
            resource: ApprovalResource::GithubToken {
                repositories: vec!["myorg/new-project".into()],
                permissions: vec!["contents:write".into(), "issues:write".into()],
            },
            reason: Some("Implementing feature from issue #45 <!channel> & more".into()),
            rule: "defaults".into(),
            created_at: "2026-02-17T15:00:00Z".into(),
            expires_at: "2026-02-18T15:00:00Z".into(),
            decided_by: None,
            decided_at: None,
            deny_reason: None,
            grant_id: None,
            remembered_rule: None,
            credential_id: None,
            poll_url: "/v1/requests/apr_a3f2b7c9".into(),
        }
    }

    const PAGE: &str = "https://creds.example.ts.net/approvals/apr_a3f2b7c9";

    #[test]
    fn requested_card_has_the_seed_layout_and_link_buttons() {
        let m = message(
            AuditEventKind::ApprovalRequested,
            &view(),
            None,
            PAGE,
            datetime!(2026-02-17 15:02:10 UTC),
        );
        let blocks = m["blocks"].as_array().unwrap();
        assert_eq!(blocks[0]["type"], "header");
        assert_eq!(
            blocks[0]["text"]["text"],
            "🔐 Credential Request #apr_a3f2b7c9"
        );
        let fields: Vec<&str> = blocks[1]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "*Bot:*\nslopcannon-bot",
                "*Repo:*\nmyorg/new-project",
                "*Permissions:*\ncontents:write, issues:write",
                "*Requested:*\n2 minutes ago",
            ]
        );
        // The bot's reason cannot ping the channel or forge a link.
        assert_eq!(
            blocks[2]["text"]["text"],
            "*Reason:* \"Implementing feature from issue #45 &lt;!channel&gt; &amp; more\""
        );
        let buttons = blocks.last().unwrap()["elements"].as_array().unwrap();
        let summary: Vec<(&str, &str, Option<&str>)> = buttons
            .iter()
            .map(|b| {
                assert_eq!(b["type"], "button");
                (
                    b["text"]["text"].as_str().unwrap(),
                    b["url"].as_str().unwrap(),
                    b["style"].as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "Approve",
                    &*format!("{PAGE}?action=approve"),
                    Some("primary")
                ),
                (
                    "Approve + Remember",
                    &*format!("{PAGE}?action=remember"),
                    None
                ),
                ("Deny", &*format!("{PAGE}?action=deny"), Some("danger")),
            ]
        );
        // action_id must be unique within a block.
        let mut ids: Vec<&str> = buttons
            .iter()
            .map(|b| b["action_id"].as_str().unwrap())
            .collect();
        ids.dedup();
        assert_eq!(ids.len(), 3);
        assert!(m["text"].as_str().unwrap().contains("apr_a3f2b7c9"));
    }

    #[test]
    fn litellm_scope_and_decisions() {
        let mut v = view();
        v.resource = ApprovalResource::LitellmKey {
            scope: "agent:write".into(),
        };
        v.reason = None;
        let m = message(
            AuditEventKind::ApprovalRequested,
            &v,
            None,
            PAGE,
            datetime!(2026-02-17 18:00:00 UTC),
        );
        let fields = m["blocks"][1]["fields"].as_array().unwrap();
        assert_eq!(fields[1]["text"], "*Scope:*\nlitellm agent:write");
        assert_eq!(fields[2]["text"], "*Requested:*\n3 hours ago");
        assert_eq!(m["blocks"][2]["text"]["text"], "*Reason:* _none given_");

        let mut denied = view();
        denied.deny_reason = Some("not <yours>".into());
        let m = message(
            AuditEventKind::ApprovalDenied,
            &denied,
            Some("tailnet:alice@example.com"),
            PAGE,
            datetime!(2026-02-17 15:00:00 UTC),
        );
        let text = m["text"].as_str().unwrap();
        assert!(
            text.starts_with("⛔ Credential request #apr_a3f2b7c9"),
            "{text}"
        );
        assert!(
            text.contains("denied by tailnet:alice@example.com"),
            "{text}"
        );
        assert!(text.contains("\"not &lt;yours&gt;\""), "{text}");
        let m = message(
            AuditEventKind::ApprovalExpired,
            &view(),
            Some("clock"),
            PAGE,
            datetime!(2026-02-17 15:00:00 UTC),
        );
        assert!(m["text"].as_str().unwrap().ends_with("expired"));
        assert_eq!(m["blocks"][1]["elements"][0]["url"], PAGE);
    }

    #[test]
    fn ages_and_truncation() {
        let now = datetime!(2026-02-17 15:00:00 UTC);
        for (at, want) in [
            ("2026-02-17T15:00:30Z", "just now"),
            ("2026-02-17T14:59:30Z", "just now"),
            ("2026-02-17T14:59:00Z", "1 minute ago"),
            ("2026-02-17T13:59:00Z", "1 hour ago"),
            ("2026-02-15T15:00:00Z", "2 days ago"),
            ("not a time", "not a time"),
        ] {
            assert_eq!(age_words(at, now), want, "{at}");
        }
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(truncate("hé", 2), "hé");
    }
}
