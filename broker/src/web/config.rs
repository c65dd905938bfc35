//! `[web]` in broker.toml: whether the approval pages are served, the public URL admins reach
//! them under (links in notifications point there) and the extra host names they answer to.

use serde::Deserialize;

use crate::settings::Invalid;

/// `[web]` as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawWeb {
    enabled: Option<bool>,
    public_url: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
}

/// `[web]`: the approval pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebConfig {
    /// Whether the broker serves `/approvals` and `/audit` (default true).
    pub enabled: bool,
    /// How admins reach the broker (`https://creds.tail3f9c2.ts.net:8443`), without a trailing
    /// slash; links in notifications point here.
    pub public_url: Option<String>,
    /// Extra host names the pages answer to, lower-case (besides IP addresses, `localhost`,
    /// MagicDNS names and the public URL's host); others are refused against DNS rebinding.
    pub hosts: Vec<String>,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            enabled: true,
            public_url: None,
            hosts: Vec::new(),
        }
    }
}

impl WebConfig {
    pub fn from_raw(raw: RawWeb) -> Result<WebConfig, Invalid> {
        let public_url = match raw.public_url {
            None => None,
            Some(url) => {
                Some(check_public_url(&url).map_err(|m| Invalid::new("web.public_url", m))?)
            }
        };
        let mut hosts = Vec::new();
        for (i, h) in raw.hosts.iter().enumerate() {
            let h = h.trim().to_ascii_lowercase();
            let ok = !h.is_empty()
                && h.len() <= 253
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                return Err(Invalid::new(
                    format!("web.hosts[{i}]"),
                    format!("{h:?} is not a host name (no scheme or port)"),
                ));
            }
            hosts.push(h);
        }
        Ok(WebConfig {
            enabled: raw.enabled.unwrap_or(true),
            public_url,
            hosts,
        })
    }
}

fn check_public_url(url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} is not an http(s) URL"))?;
    // The pages link to `/approvals/...` from the root, so a path prefix would break them.
    if rest.is_empty()
        || rest.contains(['/', '?', '#', '@', ' ', '"', '<', '>'])
        || rest.chars().any(|c| c.is_control())
    {
        return Err(format!(
            "{url:?} must be scheme://host[:port] like https://creds.example.ts.net:8443 \
             (no path, query, fragment or user info)"
        ));
    }
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let web = WebConfig::from_raw(RawWeb::default()).unwrap();
        assert!(web.enabled);
        assert_eq!(web, WebConfig::default());
    }
}
