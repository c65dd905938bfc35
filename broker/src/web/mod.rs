//! The approval web page, served by the broker on the tailnet for admins only: the pending
//! list, a detail view with Approve / Approve + Remember / Deny, and the recent audit log.
//!
//! Identity is the connection's (WhoIs, or an admin API key), exactly as for the admin API;
//! there are no passwords or sessions. Pages are plain HTML without script. State changes only
//! by POST, each checked twice against cross-site forgery ([`csrf`]): the browser's
//! `Sec-Fetch-Site` and `Origin`, and a form token bound to the admin and the time. A decision
//! then goes through the same [`Approvals`](crate::approvals::Approvals) calls as the CLI, so a
//! replayed or raced form meets `already_decided` and changes nothing.
//!
//! These are HTTP handlers above the API layer: they use its shared state, its caller
//! extractor and its error type, and `api/` knows nothing of them. `server.rs` builds the
//! page routes ([`routes`]) and hands them to `api::router`, which serves them under the same
//! middleware as the API.

pub mod config;
pub mod csrf;
pub mod form;
pub mod html;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::header::{CONTENT_TYPE, HOST, LOCATION};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use botcreds_proto::ErrorCode;

pub use self::config::WebConfig;
use self::csrf::{CsrfError, CsrfKey};
use self::form::Form;
use crate::api::AppState;
use crate::api::extract::Authenticated;
use crate::clock::rfc3339_millis;
use crate::error::ApiError;
use crate::store::AuditFilter;

/// Largest form body accepted (a deny reason is at most 4 KiB; the rest is headroom).
const MAX_FORM_BYTES: usize = 64 * 1024;
/// Rows the pending list shows; the CLI lists everything.
const MAX_LISTED: usize = 500;
/// The audit page shows this much history, newest first, at most [`MAX_AUDIT_ROWS`] events.
const AUDIT_WINDOW: time::Duration = time::Duration::hours(24);
const MAX_AUDIT_ROWS: usize = 200;

/// What the pages need beyond the shared state: their config and the form-token key.
#[derive(Debug)]
pub struct WebState {
    pub config: WebConfig,
    key: CsrfKey,
}

impl WebState {
    /// With a fresh random form-token key.
    pub fn new(config: WebConfig) -> WebState {
        WebState {
            config,
            key: CsrfKey::random(),
        }
    }
}

/// The pages' state: the API's shared handle and what only the pages need.
#[derive(Clone)]
pub struct Pages {
    app: AppState,
    web: Arc<WebState>,
}

impl std::ops::Deref for Pages {
    type Target = AppState;
    fn deref(&self) -> &AppState {
        &self.app
    }
}

/// The page routes over `app` (none when `[web] enabled = false`), for `api::router` to
/// serve under its middleware.
pub fn routes(app: AppState, web: WebState) -> Router<AppState> {
    if !web.config.enabled {
        return Router::new();
    }
    Router::new()
        .route("/approvals", get(list))
        .route("/approvals/{id}", get(show))
        .route("/approvals/{id}/approve", post(approve))
        .route("/approvals/{id}/deny", post(deny))
        .route("/audit", get(audit))
        .with_state(Pages {
            app,
            web: Arc::new(web),
        })
}

/// An admin on a page; anyone else gets an HTML error page (401, 403 or 503).
pub struct WebAdmin {
    /// As decisions record it (`tailnet:alice@example.com`); form tokens are bound to it.
    pub actor: String,
    /// The admin as the approval service checks decisions (self-approval).
    pub approver: crate::approvals::Approver,
}

impl FromRequestParts<Pages> for WebAdmin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Pages) -> Result<Self, Response> {
        let host = request_host(&parts.uri, &parts.headers);
        let unreadable = host.is_none() && parts.headers.contains_key(HOST);
        if unreadable || !csrf::host_allowed(host, &state.web.config) {
            tracing::warn!(
                host = host.unwrap_or("-"),
                "approval page asked for under a foreign host name; refused"
            );
            return Err(page_response(
                StatusCode::FORBIDDEN,
                "Forbidden",
                None,
                &html::error_body(
                    "Forbidden",
                    "This page is served only under the broker's own names (its addresses, \
                     MagicDNS names, [web] public_url and [web] hosts).",
                    Some(ErrorCode::Forbidden.as_str()),
                ),
            ));
        }
        let Authenticated(caller) = Authenticated::from_request_parts(parts, &state.app)
            .await
            .map_err(|e| api_error_page(None, &e))?;
        let caller = caller.map_err(|e| api_error_page(None, &e))?;
        if crate::identity::admin::is_admin(&state.admin, &caller) {
            Ok(WebAdmin {
                actor: crate::api::admin::actor(&caller),
                approver: crate::api::admin::approver(&state.app, &caller),
            })
        } else {
            tracing::warn!(caller = %caller.describe(), path = %parts.uri.path(), "non-admin caller on the approval page");
            Err(page_response(
                StatusCode::FORBIDDEN,
                "Forbidden",
                None,
                &html::error_body(
                    "Forbidden",
                    &format!(
                        "This page is for botcreds admins ([admin] in broker.toml); you are {}.",
                        caller.describe()
                    ),
                    Some(ErrorCode::Forbidden.as_str()),
                ),
            ))
        }
    }
}

/// The host the request was sent to: the URI's authority (HTTP/2) or the `Host` header.
fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok()))
}

/// A page with the headers every page carries.
fn page_response(status: StatusCode, title: &str, who: Option<&str>, body: &str) -> Response {
    let mut response = (status, html::page(title, who, body)).into_response();
    let h = response.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(csp) = HeaderValue::from_str(html::content_security_policy()) {
        h.insert("content-security-policy", csp);
    }
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    // `same-origin` (not `no-referrer`) so browsers keep sending our Origin on our own POSTs.
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    // Pages carry form tokens and live state.
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    response
}

fn api_error_page(who: Option<&str>, e: &ApiError) -> Response {
    let title = match e.status() {
        StatusCode::UNAUTHORIZED => "Who are you?",
        StatusCode::FORBIDDEN => "Forbidden",
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::CONFLICT => "Already decided",
        s if s.is_server_error() => "Broker error",
        _ => "Refused",
    };
    page_response(
        e.status(),
        title,
        who,
        &html::error_body(title, &e.message, Some(e.code.as_str())),
    )
}

fn csrf_refusal(admin: &WebAdmin, id: &str, e: &CsrfError) -> Response {
    tracing::warn!(actor = %admin.actor, request_id = %id, reason = %e, "web form refused (CSRF check)");
    page_response(
        StatusCode::FORBIDDEN,
        "Form refused",
        Some(&admin.actor),
        &html::error_body(
            "Form refused",
            &e.to_string(),
            Some(ErrorCode::Forbidden.as_str()),
        ),
    )
}

fn unknown(who: &str, id: &str) -> Response {
    api_error_page(
        Some(who),
        &ApiError::new(
            ErrorCode::UnknownRequest,
            format!("no approval request has the id {id:?}"),
        ),
    )
}

async fn list(State(state): State<Pages>, admin: WebAdmin) -> Response {
    let pending = match state.approvals.pending() {
        Ok(p) => p,
        Err(e) => return api_error_page(Some(&admin.actor), &ApiError::from(e)),
    };
    let mut body = html::pending_list(&pending[..pending.len().min(MAX_LISTED)], state.clock.now());
    if pending.len() > MAX_LISTED {
        body.push_str(&format!(
            "<p>{} more pending requests are not shown; use <code>botcreds pending</code>.</p>",
            pending.len() - MAX_LISTED
        ));
    }
    page_response(
        StatusCode::OK,
        "Pending approvals",
        Some(&admin.actor),
        &body,
    )
}

async fn show(
    State(state): State<Pages>,
    admin: WebAdmin,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    if !html::is_request_id(&id) {
        return unknown(&admin.actor, &id);
    }
    let request = match state.approvals.get(&id) {
        Ok(r) => r,
        Err(e) => return api_error_page(Some(&admin.actor), &ApiError::from(e)),
    };
    let now = state.clock.now();
    let token = state.web.key.token(&admin.actor, now.unix_timestamp());
    // The chat card's buttons say which action they meant; an unreadable query is ignored.
    let query = query
        .and_then(|q| Form::parse(q.as_bytes()).ok())
        .unwrap_or_default();
    let body = html::detail(&request, now, Some(&token), query.get("action"));
    page_response(
        StatusCode::OK,
        &format!("Request {id}"),
        Some(&admin.actor),
        &body,
    )
}

/// The checks every decision form passes before anything happens: a known-looking id, a
/// same-origin browser request, a form body, and this admin's fresh token.
async fn checked_form(
    state: &Pages,
    admin: &WebAdmin,
    id: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Form, Response> {
    if !html::is_request_id(id) {
        return Err(unknown(&admin.actor, id));
    }
    let host = request_host(uri, headers);
    csrf::check_origin(headers, host, state.web.config.public_url.as_deref())
        .map_err(|e| csrf_refusal(admin, id, &e))?;
    let is_form = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(api_error_page(
            Some(&admin.actor),
            &ApiError::new(
                ErrorCode::UnsupportedMediaType,
                "send the form as application/x-www-form-urlencoded",
            ),
        ));
    }
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| {
            api_error_page(
                Some(&admin.actor),
                &ApiError::new(
                    ErrorCode::BodyTooLarge,
                    "the form is larger than 64 KiB; nothing was changed",
                ),
            )
        })?;
    let form = Form::parse(&bytes).map_err(|e| {
        api_error_page(
            Some(&admin.actor),
            &ApiError::new(ErrorCode::InvalidRequest, e.to_string()),
        )
    })?;
    state
        .web
        .key
        .check(
            form.get("csrf"),
            &admin.actor,
            state.clock.now().unix_timestamp(),
        )
        .map_err(|e| csrf_refusal(admin, id, &e))?;
    Ok(form)
}

fn see_request(id: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/approvals/{id}")) {
        response.headers_mut().insert(LOCATION, location);
    }
    response
        .headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    response
}

async fn approve(
    State(state): State<Pages>,
    admin: WebAdmin,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form = match checked_form(&state, &admin, &id, &uri, &headers, body).await {
        Ok(f) => f,
        Err(page) => return page,
    };
    let remember = match form.get("remember") {
        None => false,
        Some("1") => true,
        Some(_) => {
            return api_error_page(
                Some(&admin.actor),
                &ApiError::new(ErrorCode::InvalidRequest, "remember must be 1 or absent"),
            );
        }
    };
    match state
        .approvals
        .approve_checked(&admin.approver, &id, remember, form.get("bot"))
        .await
    {
        Ok(_) => {
            tracing::info!(actor = %admin.actor, request_id = %id, remember, "approved on the web page");
            see_request(&id)
        }
        Err(e) => api_error_page(Some(&admin.actor), &ApiError::from(e)),
    }
}

async fn deny(
    State(state): State<Pages>,
    admin: WebAdmin,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form = match checked_form(&state, &admin, &id, &uri, &headers, body).await {
        Ok(f) => f,
        Err(page) => return page,
    };
    // Browsers send a textarea's line breaks as CRLF; the reason allows only LF.
    let reason = form
        .get("reason")
        .map(|r| r.replace("\r\n", "\n"))
        .filter(|r| !r.trim().is_empty());
    match state
        .approvals
        .deny_checked(&admin.actor, &id, reason.as_deref(), form.get("bot"))
        .await
    {
        Ok(_) => {
            tracing::info!(actor = %admin.actor, request_id = %id, "denied on the web page");
            see_request(&id)
        }
        Err(e) => api_error_page(Some(&admin.actor), &ApiError::from(e)),
    }
}

async fn audit(State(state): State<Pages>, admin: WebAdmin) -> Response {
    let since = rfc3339_millis(state.clock.now() - AUDIT_WINDOW);
    let log = state.audit.clone();
    let read = tokio::task::spawn_blocking(move || {
        // Read back from the end, at most the rows shown: never the whole day's log.
        log.read(&AuditFilter {
            since: Some(since),
            limit: MAX_AUDIT_ROWS,
            newest: true,
            ..AuditFilter::default()
        })
    })
    .await;
    let mut events = match read {
        Ok(Ok(events)) => events,
        Ok(Err(e)) => return api_error_page(Some(&admin.actor), &ApiError::internal(e)),
        Err(e) => return api_error_page(Some(&admin.actor), &ApiError::internal(e)),
    };
    events.reverse();
    let mut body = html::audit_table(&events);
    body.push_str("<p>The last 24 hours, newest first; <code>botcreds log</code> shows more.</p>");
    page_response(StatusCode::OK, "Audit log", Some(&admin.actor), &body)
}
