//! Cross-site request forgery protection for the approval page's forms, in two independent
//! layers: the browser's own word (`Sec-Fetch-Site`, `Origin`) that the request comes from our
//! page, and a form token only our page can have produced for this admin.
//!
//! The token is `v1.<issued unix seconds>.<hex HMAC-SHA256>` over the admin's identity and the
//! issue time, keyed by a random key each broker process draws at start (so a restart
//! invalidates open forms, which costs a reload). It is refused when it is older than
//! [`TOKEN_TTL_SECS`], from the future, or minted for another identity; a replayed token is
//! harmless because a decided request cannot be decided again.

use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroize;

use super::WebConfig;

/// How long a rendered form stays usable.
pub const TOKEN_TTL_SECS: i64 = 2 * 3600;
/// Clock skew tolerated for a token "from the future" (several brokers behind one name).
const FUTURE_SKEW_SECS: i64 = 60;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrfError {
    #[error("the form carries no token; reload the page and try again")]
    MissingToken,
    #[error("the form's token is not one this broker issued; reload the page and try again")]
    BadToken,
    #[error("the form has expired; reload the page and try again")]
    Expired,
    #[error("the browser says this request comes from another site ({0})")]
    CrossSite(String),
    #[error("the request's Origin ({0}) is not this broker")]
    ForeignOrigin(String),
}

/// The per-process key tokens are signed with.
pub struct CsrfKey([u8; 32]);

impl std::fmt::Debug for CsrfKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CsrfKey(<redacted>)")
    }
}

impl Drop for CsrfKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl CsrfKey {
    /// A fresh random key.
    pub fn random() -> CsrfKey {
        CsrfKey(rand::random())
    }

    #[cfg(test)]
    pub fn from_bytes(bytes: [u8; 32]) -> CsrfKey {
        CsrfKey(bytes)
    }

    fn mac(&self, identity: &str, issued: i64) -> Hmac<Sha256> {
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        // Length-prefixed, so no two (identity, time) pairs share an input.
        mac.update(
            format!(
                "botcreds-web-form.v1:{}:{identity}:{issued}",
                identity.len()
            )
            .as_bytes(),
        );
        mac
    }

    /// A token for forms rendered for `identity` at `now` (unix seconds).
    pub fn token(&self, identity: &str, now: i64) -> String {
        let tag = self.mac(identity, now).finalize().into_bytes();
        format!("v1.{now}.{}", hex::encode(tag))
    }

    /// Accept `token` only if this key issued it for `identity` within the last
    /// [`TOKEN_TTL_SECS`]; the tag is compared in constant time.
    pub fn check(&self, token: Option<&str>, identity: &str, now: i64) -> Result<(), CsrfError> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(CsrfError::MissingToken)?;
        let mut parts = token.splitn(3, '.');
        let (Some("v1"), Some(issued), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(CsrfError::BadToken);
        };
        let issued: i64 = issued.parse().map_err(|_| CsrfError::BadToken)?;
        let tag = hex::decode(tag).map_err(|_| CsrfError::BadToken)?;
        // Check the tag before the time, so an attacker learns nothing from which error.
        self.mac(identity, issued)
            .verify_slice(&tag)
            .map_err(|_| CsrfError::BadToken)?;
        if issued > now + FUTURE_SKEW_SECS || now - issued > TOKEN_TTL_SECS {
            return Err(CsrfError::Expired);
        }
        Ok(())
    }
}

/// The browser's side: refuse a request that `Sec-Fetch-Site` says is cross-site or
/// same-site-but-other-origin, or whose `Origin` is neither the `Host` it was sent to nor the
/// configured public URL. A request with neither header is not from a (modern) browser's
/// form; the token still guards it.
pub fn check_origin(
    headers: &HeaderMap,
    host: Option<&str>,
    public_url: Option<&str>,
) -> Result<(), CsrfError> {
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("(unreadable)");
        if !matches!(site, "same-origin" | "none") {
            return Err(CsrfError::CrossSite(clip(site)));
        }
    }
    let Some(origin) = headers.get("origin") else {
        return Ok(());
    };
    let origin = origin
        .to_str()
        .map_err(|_| CsrfError::ForeignOrigin("(unreadable)".into()))?;
    let matches_host = host.is_some_and(|host| {
        ["http://", "https://"].iter().any(|scheme| {
            origin
                .strip_prefix(scheme)
                .is_some_and(|rest| rest.eq_ignore_ascii_case(host))
        })
    });
    let matches_public = public_url
        .map(origin_of)
        .is_some_and(|public| public.eq_ignore_ascii_case(origin));
    if matches_host || matches_public {
        Ok(())
    } else {
        Err(CsrfError::ForeignOrigin(clip(origin)))
    }
}

/// Whether the pages answer to `host` (the `Host` the browser sent, port or not): IP
/// addresses, `localhost`, MagicDNS names (one label, or under `.ts.net`), the public URL's
/// host and `[web] hosts`. Any other name means a page of another site whose DNS name was
/// pointed at the broker (DNS rebinding) — same-origin to the browser, so only the name tells.
/// No `Host` at all is not a browser.
pub fn host_allowed(host: Option<&str>, config: &WebConfig) -> bool {
    let Some(host) = host else {
        return true;
    };
    let name = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
    if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    if name.parse::<std::net::IpAddr>().is_ok() || name == "localhost" {
        return true;
    }
    if name.is_empty() {
        return false;
    }
    let public = config
        .public_url
        .as_deref()
        .map(|u| strip_port(u.split_once("://").map_or(u, |(_, rest)| rest)).to_ascii_lowercase());
    !name.contains('.')
        || name.ends_with(".ts.net")
        || public.as_deref() == Some(name.as_str())
        || config.hosts.contains(&name)
}

/// `host[:port]` → `host`; `[v6]:port` → `[v6]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// `scheme://host[:port]` of a URL.
fn origin_of(url: &str) -> &str {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// Header values go into error pages (escaped); keep them short.
fn clip(text: &str) -> String {
    text.chars().take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const ALICE: &str = "tailnet:alice@example.com";
    const T: i64 = 1_790_000_000;

    fn key() -> CsrfKey {
        CsrfKey::from_bytes([7; 32])
    }

    #[test]
    fn own_fresh_token_passes() {
        let k = key();
        let token = k.token(ALICE, T);
        assert!(token.starts_with(&format!("v1.{T}.")));
        assert_eq!(k.check(Some(&token), ALICE, T), Ok(()));
        assert_eq!(k.check(Some(&token), ALICE, T + TOKEN_TTL_SECS), Ok(()));
        // Within the skew allowance of a slightly slower clock.
        assert_eq!(k.check(Some(&token), ALICE, T - 30), Ok(()));
    }

    #[test]
    fn wrong_expired_and_foreign_tokens_are_refused() {
        let k = key();
        let token = k.token(ALICE, T);
        let cases: Vec<(Option<String>, &str, i64, CsrfError)> = vec![
            (None, ALICE, T, CsrfError::MissingToken),
            (Some(String::new()), ALICE, T, CsrfError::MissingToken),
            (Some("v1.x.y".into()), ALICE, T, CsrfError::BadToken),
            (Some("garbage".into()), ALICE, T, CsrfError::BadToken),
            // Another admin's token.
            (
                Some(token.clone()),
                "tailnet:bob@example.com",
                T,
                CsrfError::BadToken,
            ),
            // Too old, and from the future.
            (
                Some(token.clone()),
                ALICE,
                T + TOKEN_TTL_SECS + 1,
                CsrfError::Expired,
            ),
            (Some(token.clone()), ALICE, T - 3600, CsrfError::Expired),
            // Another broker's key.
            (
                Some(CsrfKey::from_bytes([8; 32]).token(ALICE, T)),
                ALICE,
                T,
                CsrfError::BadToken,
            ),
            // The time changed under the same tag.
            (
                Some(token.replacen(&T.to_string(), &(T + 5).to_string(), 1)),
                ALICE,
                T + 5,
                CsrfError::BadToken,
            ),
            // A truncated tag.
            (
                Some(token[..token.len() - 2].to_string()),
                ALICE,
                T,
                CsrfError::BadToken,
            ),
        ];
        for (i, (token, who, now, want)) in cases.into_iter().enumerate() {
            assert_eq!(k.check(token.as_deref(), who, now), Err(want), "case {i}");
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn host_names_against_dns_rebinding() {
        let config = WebConfig {
            enabled: true,
            public_url: Some("https://creds.example.com:8443".into()),
            hosts: vec!["botcreds.corp.example".into()],
        };
        for (host, want) in [
            (None, true),
            (Some("127.0.0.1:8443"), true),
            (Some("100.101.102.7"), true),
            (Some("[fd7a:115c:a1e0::1]:8443"), true),
            (Some("localhost:8443"), true),
            (Some("creds:8443"), true),
            (Some("creds.tail3f9c2.ts.net"), true),
            (Some("CREDS.tail3f9c2.ts.net.:8443"), true),
            (Some("creds.example.com:8443"), true),
            (Some("botcreds.corp.example"), true),
            (Some("evil.example:8443"), false),
            (Some("creds.example.com.evil.example"), false),
            (Some("ts.net.evil.example"), false),
            (Some("[not-v6]:1"), false),
            (Some(""), false),
        ] {
            assert_eq!(host_allowed(host, &config), want, "{host:?}");
        }
        assert!(!host_allowed(
            Some("creds.example.com"),
            &WebConfig::default()
        ));
    }

    #[test]
    fn origin_checks() {
        let host = Some("127.0.0.1:8443");
        let public = Some("https://creds.example.ts.net:8443");
        let ok = [
            headers(&[]),
            headers(&[("sec-fetch-site", "same-origin")]),
            headers(&[("sec-fetch-site", "none")]),
            headers(&[
                ("sec-fetch-site", "same-origin"),
                ("origin", "http://127.0.0.1:8443"),
            ]),
            headers(&[("origin", "https://CREDS.example.ts.net:8443")]),
        ];
        for (i, h) in ok.iter().enumerate() {
            assert_eq!(check_origin(h, host, public), Ok(()), "ok case {i}");
        }
        let refused = [
            headers(&[("sec-fetch-site", "cross-site")]),
            headers(&[("sec-fetch-site", "same-site")]),
            headers(&[
                ("sec-fetch-site", "cross-site"),
                ("origin", "http://127.0.0.1:8443"),
            ]),
            headers(&[("origin", "https://evil.example")]),
            headers(&[("origin", "null")]),
            headers(&[("origin", "http://127.0.0.1:8444")]),
            headers(&[("origin", "http://127.0.0.1:8443.evil.example")]),
            headers(&[
                ("sec-fetch-site", "same-origin"),
                ("origin", "https://evil.example"),
            ]),
        ];
        for (i, h) in refused.iter().enumerate() {
            assert!(check_origin(h, host, public).is_err(), "refused case {i}");
        }
        // Without a Host, only the public URL can match.
        assert!(
            check_origin(&headers(&[("origin", "http://127.0.0.1:8443")]), None, None).is_err()
        );
        assert_eq!(origin_of("https://a.example:1/x/y"), "https://a.example:1");
        assert_eq!(origin_of("https://a.example"), "https://a.example");
    }
}
