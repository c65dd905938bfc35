//! The approval pages as plain server-rendered HTML: every value goes through [`escape`], the
//! pages carry no script, and their one stylesheet is inline and pinned by hash in the
//! Content-Security-Policy.

use std::fmt::Write;
use std::sync::OnceLock;

use base64::Engine;
use botcreds_proto::audit::AuditEvent;
use botcreds_proto::{ApprovalRequestView, ApprovalResource, ApprovalState};
use time::OffsetDateTime;

use crate::notify::slack::{ACTION_APPROVE, ACTION_DENY, ACTION_REMEMBER, age_words, truncate};

const CSS: &str = "body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}\
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.2em;align-items:center}\
header a{color:#fff}header .who{margin-left:auto;opacity:.8}\
main{padding:1em 1.2em;max-width:72em}table{border-collapse:collapse;width:100%;background:#fff}\
th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #dde1e7;vertical-align:top}\
th{background:#eef0f4}.reason{white-space:pre-wrap;word-break:break-word}\
.actions{display:flex;gap:1em;flex-wrap:wrap;margin:1em 0}.actions form{background:#fff;padding:.8em;border:1px solid #dde1e7}\
button{font:inherit;padding:.35em 1em;cursor:pointer}.approve{background:#1f7a3a;color:#fff;border:0}\
.deny{background:#b3261e;color:#fff;border:0}.suggested{outline:3px solid #f0b400}\
textarea{width:24em;height:4em;display:block;margin-bottom:.5em}\
.state{font-weight:600}.error{background:#fdecea;border:1px solid #b3261e;padding:1em}\
#audit{font-size:13px}#audit td:nth-child(2){white-space:nowrap}";

/// Escape text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The Content-Security-Policy of every page: nothing but our inline stylesheet, forms that
/// post only to us, and no framing.
pub fn content_security_policy() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| {
        use sha2::Digest;
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(CSS));
        format!(
            "default-src 'none'; style-src 'sha256-{hash}'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'"
        )
    })
}

/// A whole page around `body`; `who` is the signed-in admin, if known.
pub fn page(title: &str, who: Option<&str>, body: &str) -> String {
    let who = who
        .map(|w| format!("<span class=\"who\">{}</span>", escape(w)))
        .unwrap_or_default();
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · botcreds</title><style>{CSS}</style></head><body>\
         <header><strong>botcreds</strong><a href=\"/approvals\">Pending approvals</a>\
         <a href=\"/audit\">Audit log</a>{who}</header><main>{body}</main></body></html>\n",
        title = escape(title),
    )
}

/// An error page body: what went wrong and, where there is one, the error code.
pub fn error_body(title: &str, message: &str, code: Option<&str>) -> String {
    let code = code
        .map(|c| format!(" <code id=\"error-code\">{}</code>", escape(c)))
        .unwrap_or_default();
    format!(
        "<h1>{}</h1><div class=\"error\"><p id=\"error\">{}{code}</p></div>\
         <p><a href=\"/approvals\">Back to pending approvals</a></p>",
        escape(title),
        escape(message)
    )
}

fn resource_cells(resource: &ApprovalResource) -> (String, String) {
    match resource {
        ApprovalResource::GithubToken {
            repositories,
            permissions,
        } => (repositories.join(", "), permissions.join(", ")),
        ApprovalResource::LitellmKey { .. } => (resource.summary(), String::new()),
        ApprovalResource::DeployKey {
            repository,
            permission,
        } => (format!("deploy key {repository}"), permission.clone()),
    }
}

/// The pending list, oldest first.
pub fn pending_list(requests: &[ApprovalRequestView], now: OffsetDateTime) -> String {
    let mut out = String::from("<h1>Pending approvals</h1>");
    if requests.is_empty() {
        out.push_str("<p id=\"none-pending\">Nothing is waiting for a decision.</p>");
        return out;
    }
    out.push_str(
        "<table id=\"pending\"><thead><tr><th>Request</th><th>Bot</th><th>Repo or scope</th>\
         <th>Permissions</th><th>Reason</th><th>Age</th><th>Expires</th></tr></thead><tbody>",
    );
    for r in requests {
        let (what, permissions) = resource_cells(&r.resource);
        let _ = write!(
            out,
            "<tr data-request-id=\"{id}\"><td><a class=\"request\" href=\"/approvals/{id}\">{id}</a></td>\
             <td>{bot}</td><td>{what}</td><td>{permissions}</td><td class=\"reason\">{reason}</td>\
             <td>{age}</td><td>{expires}</td></tr>",
            id = escape(&r.request_id),
            bot = escape(r.bot.as_deref().unwrap_or("(no policy bot)")),
            what = escape(&what),
            permissions = escape(&permissions),
            reason = escape(&truncate(r.reason.as_deref().unwrap_or(""), 200)),
            age = escape(&age_words(&r.created_at, now)),
            expires = escape(&r.expires_at),
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// The detail view; with `csrf` (only for pending requests) the decision forms. `suggested`
/// is the `?action=` a chat button asked for, put forward with focus.
pub fn detail(
    r: &ApprovalRequestView,
    now: OffsetDateTime,
    csrf: Option<&str>,
    suggested: Option<&str>,
) -> String {
    let (what, permissions) = resource_cells(&r.resource);
    let mut rows: Vec<(&str, String)> = vec![
        ("State", r.state.as_str().to_string()),
        (
            "Bot",
            r.bot.clone().unwrap_or_else(|| "(no policy bot)".into()),
        ),
        ("Caller", r.caller.clone()),
        ("Repo or scope", what),
    ];
    if !permissions.is_empty() {
        rows.push(("Permissions", permissions));
    }
    rows.push(("Reason", r.reason.clone().unwrap_or_default()));
    rows.push(("Rule", r.rule.clone()));
    rows.push((
        "Requested",
        format!("{} ({})", r.created_at, age_words(&r.created_at, now)),
    ));
    rows.push(("Expires", r.expires_at.clone()));
    let optional = [
        ("Decided by", &r.decided_by),
        ("Decided at", &r.decided_at),
        ("Deny reason", &r.deny_reason),
        ("Grant", &r.grant_id),
        ("Remembered rule", &r.remembered_rule),
        ("Credential", &r.credential_id),
    ];
    for (label, value) in optional {
        if let Some(v) = value {
            rows.push((label, v.clone()));
        }
    }
    let mut out = format!(
        "<h1>Credential request <span id=\"request-id\">{}</span></h1><table id=\"detail\">",
        escape(&r.request_id)
    );
    for (label, value) in rows {
        let (class, id) = match label {
            "State" => (" class=\"state\"", " id=\"state\""),
            "Reason" | "Deny reason" => (" class=\"reason\"", ""),
            _ => ("", ""),
        };
        let _ = write!(
            out,
            "<tr><th>{}</th><td{class}{id}>{}</td></tr>",
            escape(label),
            escape(&value)
        );
    }
    out.push_str("</table>");
    match (r.state, csrf) {
        (ApprovalState::Pending, Some(token)) => out.push_str(&forms(r, token, suggested)),
        (ApprovalState::Pending, None) => {}
        _ => out.push_str("<p id=\"decided\">This request has been decided.</p>"),
    }
    out
}

fn forms(r: &ApprovalRequestView, token: &str, suggested: Option<&str>) -> String {
    let id = escape(&r.request_id);
    let hidden = {
        let mut h = format!(
            "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
            escape(token)
        );
        if let Some(bot) = &r.bot {
            let _ = write!(
                h,
                "<input type=\"hidden\" name=\"bot\" value=\"{}\">",
                escape(bot)
            );
        }
        h
    };
    let mark = |action: &str| {
        if suggested == Some(action) {
            " suggested\" autofocus=\"autofocus"
        } else {
            ""
        }
    };
    let approve_mark = mark(ACTION_APPROVE);
    let remember_form = if r.bot.is_some() {
        format!(
            "<form method=\"post\" action=\"/approvals/{id}/approve\">{hidden}\
             <input type=\"hidden\" name=\"remember\" value=\"1\">\
             <button id=\"remember\" class=\"approve{m}\" type=\"submit\">Approve + Remember</button>\
             <p>Also adds an auto_approve rule for this bot and resource.</p></form>",
            m = mark(ACTION_REMEMBER)
        )
    } else {
        String::new()
    };
    format!(
        "<div class=\"actions\">\
         <form method=\"post\" action=\"/approvals/{id}/approve\">{hidden}\
         <button id=\"approve\" class=\"approve{approve_mark}\" type=\"submit\">Approve</button>\
         <p>One-time approval.</p></form>\
         {remember_form}\
         <form method=\"post\" action=\"/approvals/{id}/deny\">{hidden}\
         <label for=\"deny-reason\">Reason (shown to the bot)</label>\
         <textarea id=\"deny-reason\" name=\"reason\" maxlength=\"4096\"></textarea>\
         <button id=\"deny\" class=\"deny{m}\" type=\"submit\">Deny</button></form></div>",
        m = mark(ACTION_DENY)
    )
}

/// The recent audit log, newest first.
pub fn audit_table(events: &[AuditEvent]) -> String {
    let mut out = String::from("<h1>Audit log</h1>");
    if events.is_empty() {
        out.push_str("<p>No events in this period.</p>");
        return out;
    }
    out.push_str(
        "<table id=\"audit\"><thead><tr><th>#</th><th>Time</th><th>Event</th><th>Bot</th>\
         <th>Caller</th><th>Resource</th><th>Approval</th><th>Request</th><th>Detail</th>\
         </tr></thead><tbody>",
    );
    for e in events {
        let mut resource = if e.repositories.is_empty() {
            e.repo.clone().unwrap_or_default()
        } else {
            e.repositories.join(", ")
        };
        if !e.permissions.is_empty() {
            if !resource.is_empty() {
                resource.push(' ');
            }
            resource.push_str(&e.permissions.join(","));
        }
        let request = match &e.request_id {
            Some(id) if is_request_id(id) => {
                format!("<a href=\"/approvals/{id}\">{id}</a>", id = escape(id))
            }
            Some(id) => escape(id),
            None => String::new(),
        };
        let detail = [&e.reason, &e.code, &e.rule, &e.detail]
            .iter()
            .filter_map(|v| v.as_deref())
            .collect::<Vec<_>>()
            .join(" · ");
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{request}</td><td class=\"reason\">{}</td></tr>",
            e.seq,
            escape(&e.timestamp),
            escape(e.event.as_str()),
            escape(e.bot.as_deref().unwrap_or("")),
            escape(e.caller.as_deref().unwrap_or("")),
            escape(&resource),
            escape(e.approval.as_deref().unwrap_or("")),
            escape(&truncate(&detail, 300)),
        );
    }
    out.push_str("</tbody></table>");
    out
}

/// Whether `id` looks like an approval request id (so it can go into a URL path as is).
pub fn is_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use botcreds_proto::audit::AuditEventKind;
    use time::macros::datetime;

    const EVIL: &str = "<script>alert('x')</script>\"&";

    fn view(state: ApprovalState) -> ApprovalRequestView {
        ApprovalRequestView {
            request_id: "apr_abcd2345".into(),
            state,
            bot: Some(format!("bot{EVIL}")),
            caller: format!("tailnet:{EVIL}"),
            resource: ApprovalResource::GithubToken {
                repositories: vec![format!("acme/{EVIL}")],
                permissions: vec![format!("contents:{EVIL}")],
            },
            reason: Some(format!("because {EVIL}")),
            rule: format!("bots.{EVIL}.requires_approval[0]"),
            created_at: "2026-02-17T15:00:00Z".into(),
            expires_at: "2026-02-18T15:00:00Z".into(),
            decided_by: None,
            decided_at: None,
            deny_reason: Some(EVIL.into()),
            grant_id: None,
            remembered_rule: None,
            credential_id: None,
            poll_url: "/v1/requests/apr_abcd2345".into(),
        }
    }

    #[test]
    fn escape_covers_the_five_characters() {
        assert_eq!(
            escape(EVIL),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;"
        );
        assert_eq!(escape("plain é"), "plain é");
    }

    /// No input-derived `<`, `"` or `'` survives into any page.
    #[test]
    fn pages_escape_everything_from_requests_and_the_log() {
        let now = datetime!(2026-02-17 15:05:00 UTC);
        let mut event = AuditEvent::new(AuditEventKind::ApprovalDenied, EVIL.into());
        event.bot = Some(EVIL.into());
        event.caller = Some(EVIL.into());
        event.reason = Some(EVIL.into());
        event.detail = Some(EVIL.into());
        event.request_id = Some(EVIL.into());
        event.repositories = vec![EVIL.into()];
        let pages = [
            pending_list(&[view(ApprovalState::Pending)], now),
            detail(
                &view(ApprovalState::Pending),
                now,
                Some("v1.1.ab"),
                Some(EVIL),
            ),
            detail(&view(ApprovalState::Denied), now, None, None),
            audit_table(&[event]),
            error_body(EVIL, EVIL, Some(EVIL)),
            page(EVIL, Some(EVIL), ""),
        ];
        for (i, html) in pages.iter().enumerate() {
            assert!(!html.contains("<script"), "page {i}: {html}");
            assert!(!html.contains("alert('x')"), "page {i}");
            assert!(html.contains("&lt;script&gt;"), "page {i}: {html}");
        }
    }

    #[test]
    fn detail_forms_only_for_pending_requests() {
        let now = datetime!(2026-02-17 15:05:00 UTC);
        let pending = detail(&view(ApprovalState::Pending), now, Some("v1.1.ab"), None);
        assert!(pending.contains("action=\"/approvals/apr_abcd2345/approve\""));
        assert!(pending.contains("action=\"/approvals/apr_abcd2345/deny\""));
        assert!(pending.contains("name=\"csrf\" value=\"v1.1.ab\""));
        assert!(pending.contains("id=\"remember\""));
        assert_eq!(pending.matches("method=\"post\"").count(), 3);
        assert!(pending.contains("5 minutes ago"));
        let decided = detail(&view(ApprovalState::Approved), now, Some("v1.1.ab"), None);
        assert!(!decided.contains("<form") && !decided.contains("v1.1.ab"));
        // A chat button's action puts that button forward.
        let deny = detail(
            &view(ApprovalState::Pending),
            now,
            Some("t"),
            Some(ACTION_DENY),
        );
        assert!(deny.contains("class=\"deny suggested\" autofocus=\"autofocus\""));
        assert_eq!(deny.matches("autofocus=").count(), 1);
    }

    #[test]
    fn request_ids_for_urls() {
        assert!(is_request_id("apr_ABCD2345"));
        assert!(!is_request_id(""));
        assert!(!is_request_id("apr_x/../y"));
        assert!(!is_request_id("apr x"));
        assert!(!is_request_id(&"a".repeat(65)));
    }

    #[test]
    fn csp_pins_the_stylesheet() {
        let csp = content_security_policy();
        assert!(csp.starts_with("default-src 'none'; style-src 'sha256-"));
        assert!(csp.contains("form-action 'self'"));
    }
}
