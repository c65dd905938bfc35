//! The git credential helper protocol codec (`git-credential(1)`): the `key=value` descriptions
//! git and its helpers exchange. Plain data: callers do the reading and writing.
//!
//! Parsing follows git's `credential_read_fp` (see `shared/reference/git-credential-protocol.md`):
//! split at the first `=`, `key[]` appends and an empty value clears, `url=` replaces the whole
//! description, unknown keys are ignored, a blank line or the end of input ends the list. It is
//! stricter than git in two places, because a helper's input that breaks these rules is garbled
//! or hostile: a line without `=` or with a NUL byte is an error, and so is a carriage return
//! inside a known value (git with `credential.protectProtocol` never sends one).

use std::fmt;

/// Longest line, including its newline, that git reads or writes.
pub const MAX_LINE_BYTES: usize = 65_535;

/// One credential description, as git sends it to a helper or a helper answers.
///
/// `password`, `credential` and `oauth_refresh_token` are secrets: `Debug` never shows them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Description {
    /// `capability[]`: what the sender understands (`authtype`, `state`), in order.
    pub capabilities: Vec<String>,
    pub authtype: Option<String>,
    pub credential: Option<String>,
    pub ephemeral: bool,
    pub protocol: Option<String>,
    /// Host name including `:port` when the URL had one.
    pub host: Option<String>,
    /// Repository path without leading or trailing `/` (only with `credential.useHttpPath`).
    pub path: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub oauth_refresh_token: Option<String>,
    /// Unix seconds when the password stops working; `None` is "no expiry" (git's reading of
    /// an absent, zero, non-numeric or overflowing value).
    pub password_expiry_utc: Option<u64>,
    /// `wwwauth[]`: each `WWW-Authenticate` header of the failed HTTP response, in order.
    pub wwwauth: Vec<String>,
    /// `continue`: a non-final step of a multi-round scheme.
    pub continue_: bool,
    /// `state[]`: opaque values a helper asked to get back.
    pub state: Vec<String>,
    /// `quit`: stop consulting helpers and do not prompt.
    pub quit: bool,
}

impl fmt::Debug for Description {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("Description")
            .field("capabilities", &self.capabilities)
            .field("authtype", &self.authtype)
            .field("credential", &redact(&self.credential))
            .field("ephemeral", &self.ephemeral)
            .field("protocol", &self.protocol)
            .field("host", &self.host)
            .field("path", &self.path)
            .field("username", &self.username)
            .field("password", &redact(&self.password))
            .field("oauth_refresh_token", &redact(&self.oauth_refresh_token))
            .field("password_expiry_utc", &self.password_expiry_utc)
            .field("wwwauth", &self.wwwauth)
            .field("continue", &self.continue_)
            .field("state", &self.state)
            .field("quit", &self.quit)
            .finish()
    }
}

/// Why a description could not be read. Line numbers count from 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("credential line {line} is longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong { line: usize },
    #[error("credential line {line} has no '=' (expected key=value)")]
    MissingEquals { line: usize },
    #[error("credential line {line} contains a NUL byte")]
    Nul { line: usize },
    #[error("credential line {line}: the value of {key:?} is not UTF-8")]
    NotUtf8 { line: usize, key: &'static str },
    #[error("credential line {line}: the value of {key:?} contains a carriage return")]
    CarriageReturn { line: usize, key: &'static str },
    #[error("credential line {line}: {key:?} is not a boolean (true/false, yes/no, on/off, 1/0)")]
    InvalidBool { line: usize, key: &'static str },
    #[error("credential line {line}: url {reason}")]
    InvalidUrl { line: usize, reason: &'static str },
}

/// Why a description could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("the value of {key:?} contains a newline, carriage return or NUL byte")]
    InvalidValue { key: &'static str },
    #[error("the {key:?} line would be longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong { key: &'static str },
}

/// What the reader should do after a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Read another line.
    More,
    /// A blank line ended the description; stop reading.
    End,
}

/// An incremental reader, for callers that read a stream line by line and must stop at the
/// blank line (git may keep its end of the pipe open).
#[derive(Debug, Default)]
pub struct Parser {
    description: Description,
    line: usize,
    ended: bool,
}

impl Parser {
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Feeds one line as read, with or without its trailing `\n` (the last line before end of
    /// input may lack it). After [`Step::End`] further lines are ignored.
    pub fn feed_line(&mut self, raw: &[u8]) -> Result<Step, ParseError> {
        if self.ended {
            return Ok(Step::End);
        }
        self.line += 1;
        let line = self.line;
        if raw.len() > MAX_LINE_BYTES {
            return Err(ParseError::LineTooLong { line });
        }
        let mut text = raw.strip_suffix(b"\n").unwrap_or(raw);
        // git reads lines with strbuf_getline, which also drops the CR of a CRLF ending.
        text = text.strip_suffix(b"\r").unwrap_or(text);
        if text.is_empty() {
            self.ended = true;
            return Ok(Step::End);
        }
        if text.contains(&0) {
            return Err(ParseError::Nul { line });
        }
        let eq = text
            .iter()
            .position(|&b| b == b'=')
            .ok_or(ParseError::MissingEquals { line })?;
        let (key, value) = (&text[..eq], &text[eq + 1..]);
        let Some(key) = Key::parse(key) else {
            return Ok(Step::More);
        };
        let name = key.name();
        let value =
            std::str::from_utf8(value).map_err(|_| ParseError::NotUtf8 { line, key: name })?;
        if value.contains('\r') {
            return Err(ParseError::CarriageReturn { line, key: name });
        }
        self.apply(key, value, line)?;
        Ok(Step::More)
    }

    /// The description read so far (a reader that hit end of input calls this too).
    pub fn finish(self) -> Description {
        self.description
    }

    fn apply(&mut self, key: Key, value: &str, line: usize) -> Result<(), ParseError> {
        let d = &mut self.description;
        let set = |slot: &mut Option<String>| *slot = Some(value.to_string());
        let push = |list: &mut Vec<String>| {
            if value.is_empty() {
                list.clear();
            } else {
                list.push(value.to_string());
            }
        };
        match key {
            Key::Capability => push(&mut d.capabilities),
            Key::Authtype => set(&mut d.authtype),
            Key::Credential => set(&mut d.credential),
            Key::Ephemeral => d.ephemeral = parse_bool(value, line, key.name())?,
            Key::Protocol => set(&mut d.protocol),
            Key::Host => set(&mut d.host),
            Key::Path => set(&mut d.path),
            Key::Username => set(&mut d.username),
            Key::Password => set(&mut d.password),
            Key::OauthRefreshToken => set(&mut d.oauth_refresh_token),
            Key::PasswordExpiryUtc => d.password_expiry_utc = parse_expiry(value),
            Key::Url => {
                *d = parse_url(value).map_err(|reason| ParseError::InvalidUrl { line, reason })?
            }
            Key::Wwwauth => push(&mut d.wwwauth),
            Key::Continue => d.continue_ = parse_bool(value, line, key.name())?,
            Key::State => push(&mut d.state),
            Key::Quit => d.quit = parse_bool(value, line, key.name())?,
        }
        Ok(())
    }
}

/// Parses a whole description held in memory: up to the first blank line or the end.
pub fn parse(input: &[u8]) -> Result<Description, ParseError> {
    let mut parser = Parser::new();
    for raw in input.split_inclusive(|&b| b == b'\n') {
        if parser.feed_line(raw)? == Step::End {
            break;
        }
    }
    Ok(parser.finish())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    Capability,
    Authtype,
    Credential,
    Ephemeral,
    Protocol,
    Host,
    Path,
    Username,
    Password,
    OauthRefreshToken,
    PasswordExpiryUtc,
    Url,
    Wwwauth,
    Continue,
    State,
    Quit,
}

impl Key {
    fn parse(raw: &[u8]) -> Option<Key> {
        Some(match raw {
            b"capability[]" => Key::Capability,
            b"authtype" => Key::Authtype,
            b"credential" => Key::Credential,
            b"ephemeral" => Key::Ephemeral,
            b"protocol" => Key::Protocol,
            b"host" => Key::Host,
            b"path" => Key::Path,
            b"username" => Key::Username,
            b"password" => Key::Password,
            b"oauth_refresh_token" => Key::OauthRefreshToken,
            b"password_expiry_utc" => Key::PasswordExpiryUtc,
            b"url" => Key::Url,
            b"wwwauth[]" => Key::Wwwauth,
            b"continue" => Key::Continue,
            b"state[]" => Key::State,
            b"quit" => Key::Quit,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Key::Capability => "capability[]",
            Key::Authtype => "authtype",
            Key::Credential => "credential",
            Key::Ephemeral => "ephemeral",
            Key::Protocol => "protocol",
            Key::Host => "host",
            Key::Path => "path",
            Key::Username => "username",
            Key::Password => "password",
            Key::OauthRefreshToken => "oauth_refresh_token",
            Key::PasswordExpiryUtc => "password_expiry_utc",
            Key::Url => "url",
            Key::Wwwauth => "wwwauth[]",
            Key::Continue => "continue",
            Key::State => "state[]",
            Key::Quit => "quit",
        }
    }
}

/// git's config boolean: `true`/`yes`/`on`, `false`/`no`/`off`/empty, or an integer (non-zero
/// is true), case-insensitively.
fn parse_bool(value: &str, line: usize, key: &'static str) -> Result<bool, ParseError> {
    let lower = value.to_ascii_lowercase();
    match lower.as_str() {
        "true" | "yes" | "on" => Ok(true),
        "false" | "no" | "off" | "" => Ok(false),
        _ => lower
            .parse::<i64>()
            .map(|n| n != 0)
            .map_err(|_| ParseError::InvalidBool { line, key }),
    }
}

/// git reads the expiry with `strtoumax`: leading digits count, trailing bytes are ignored, and
/// zero, no digits or an overflow all mean "no expiry".
fn parse_expiry(value: &str) -> Option<u64> {
    let trimmed = value.trim_start();
    let unsigned = trimmed.strip_prefix('+').unwrap_or(trimmed);
    let digits = unsigned.bytes().take_while(u8::is_ascii_digit).count();
    match unsigned[..digits].parse::<u64>() {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

/// Splits `proto://[user[:pass]@]host[:port][/path]` the way git's `credential_from_url` does.
fn parse_url(url: &str) -> Result<Description, &'static str> {
    let scheme_end = url
        .find("://")
        .ok_or("has no scheme (expected proto://host/...)")?;
    if scheme_end == 0 {
        return Err("has no scheme (expected proto://host/...)");
    }
    let rest = &url[scheme_end + 3..];
    let slash = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest.find('@').filter(|&at| at < slash);
    let colon = rest.find(':');
    let mut d = Description {
        protocol: Some(url[..scheme_end].to_string()),
        ..Description::default()
    };
    let host_start = match at {
        None => 0,
        Some(at) => {
            match colon.filter(|&c| c < at) {
                None => d.username = Some(percent_decode(&rest[..at])?),
                Some(c) => {
                    d.username = Some(percent_decode(&rest[..c])?);
                    d.password = Some(percent_decode(&rest[c + 1..at])?);
                }
            }
            at + 1
        }
    };
    d.host = Some(percent_decode(&rest[host_start..slash])?);
    let path = rest[slash..].trim_start_matches('/');
    if !path.is_empty() {
        // The path starts with a non-slash byte here, so trimming never empties it.
        d.path = Some(percent_decode(path)?.trim_end_matches('/').to_string());
    }
    for v in [&d.username, &d.password, &d.host, &d.path]
        .into_iter()
        .flatten()
    {
        if v.contains(['\n', '\r', '\0']) {
            return Err("contains a newline, carriage return or NUL byte in a component");
        }
    }
    Ok(d)
}

/// `%XX` decoding without `+` handling (git's `url_decode_mem`); malformed escapes stay as is.
fn percent_decode(s: &str) -> Result<String, &'static str> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).and_then(|b| (*b as char).to_digit(16)),
                bytes.get(i + 2).and_then(|b| (*b as char).to_digit(16)),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "is not UTF-8 once percent-decoded")
}

impl Description {
    /// Whether the sender announced `capability[]=<name>`.
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| c == name)
    }

    /// Writes the description in the order git writes its own (`capability[]` first, so values
    /// that depend on a capability follow it), without a trailing blank line. `quit` comes last.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        let mut out = Vec::new();
        let mut line = |key: &'static str, value: &str| -> Result<(), EncodeError> {
            if value.contains(['\n', '\r', '\0']) {
                return Err(EncodeError::InvalidValue { key });
            }
            if key.len() + 1 + value.len() + 1 > MAX_LINE_BYTES {
                return Err(EncodeError::LineTooLong { key });
            }
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
            out.push(b'\n');
            Ok(())
        };
        for c in &self.capabilities {
            line("capability[]", c)?;
        }
        let optional: [(&'static str, &Option<String>); 2] = [
            ("authtype", &self.authtype),
            ("credential", &self.credential),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                line(key, v)?;
            }
        }
        if self.ephemeral {
            line("ephemeral", "1")?;
        }
        let optional: [(&'static str, &Option<String>); 6] = [
            ("protocol", &self.protocol),
            ("host", &self.host),
            ("path", &self.path),
            ("username", &self.username),
            ("password", &self.password),
            ("oauth_refresh_token", &self.oauth_refresh_token),
        ];
        for (key, value) in optional {
            if let Some(v) = value {
                line(key, v)?;
            }
        }
        if let Some(expiry) = self.password_expiry_utc {
            line("password_expiry_utc", &expiry.to_string())?;
        }
        for w in &self.wwwauth {
            line("wwwauth[]", w)?;
        }
        if self.continue_ {
            line("continue", "1")?;
        }
        for s in &self.state {
            line("state[]", s)?;
        }
        if self.quit {
            line("quit", "1")?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    fn list(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn parses_every_attribute() {
        let cases: Vec<(&str, &[u8], Description)> = vec![
            ("empty input", b"", Description::default()),
            ("only a blank line", b"\n", Description::default()),
            (
                "typical get",
                b"protocol=https\nhost=github.com\n\n",
                Description { protocol: s("https"), host: s("github.com"), ..Default::default() },
            ),
            (
                "EOF without blank line, last line without newline",
                b"protocol=https\nhost=github.com",
                Description { protocol: s("https"), host: s("github.com"), ..Default::default() },
            ),
            (
                "host with port and path",
                b"protocol=https\nhost=git.example.com:8443\npath=acme-corp/web.git\n",
                Description {
                    protocol: s("https"),
                    host: s("git.example.com:8443"),
                    path: s("acme-corp/web.git"),
                    ..Default::default()
                },
            ),
            ("empty host (cert:///path)", b"protocol=cert\nhost=\npath=/etc/c.pem\n", Description {
                protocol: s("cert"),
                host: s(""),
                path: s("/etc/c.pem"),
                ..Default::default()
            }),
            (
                "split at the first =",
                b"password=a=b==c\nusername=x-access-token\n",
                Description { password: s("a=b==c"), username: s("x-access-token"), ..Default::default() },
            ),
            (
                "a later value replaces an earlier one",
                b"username=a\nusername=b\n",
                Description { username: s("b"), ..Default::default() },
            ),
            (
                "password_expiry_utc and oauth_refresh_token",
                b"password=p\npassword_expiry_utc=1787403845\noauth_refresh_token=r\n",
                Description {
                    password: s("p"),
                    password_expiry_utc: Some(1_787_403_845),
                    oauth_refresh_token: s("r"),
                    ..Default::default()
                },
            ),
            ("expiry 0 is no expiry", b"password_expiry_utc=0\n", Description::default()),
            ("non-numeric expiry is no expiry", b"password_expiry_utc=soon\n", Description::default()),
            (
                "overflowing expiry is no expiry",
                b"password_expiry_utc=99999999999999999999999\n",
                Description::default(),
            ),
            (
                "expiry reads leading digits like strtoumax",
                b"password_expiry_utc= 42xyz\n",
                Description { password_expiry_utc: Some(42), ..Default::default() },
            ),
            (
                "capability[] accumulates",
                b"capability[]=authtype\ncapability[]=state\n",
                Description { capabilities: list(&["authtype", "state"]), ..Default::default() },
            ),
            (
                "empty capability[] clears",
                b"capability[]=authtype\ncapability[]=\ncapability[]=state\n",
                Description { capabilities: list(&["state"]), ..Default::default() },
            ),
            (
                "authtype, credential, ephemeral",
                b"capability[]=authtype\nauthtype=Bearer\ncredential=abc\nephemeral=1\n",
                Description {
                    capabilities: list(&["authtype"]),
                    authtype: s("Bearer"),
                    credential: s("abc"),
                    ephemeral: true,
                    ..Default::default()
                },
            ),
            (
                "state[] and continue",
                b"capability[]=state\nstate[]=botcreds:1\nstate[]=other:x\ncontinue=true\n",
                Description {
                    capabilities: list(&["state"]),
                    state: list(&["botcreds:1", "other:x"]),
                    continue_: true,
                    ..Default::default()
                },
            ),
            (
                "wwwauth[] in order, and clearing",
                b"wwwauth[]=Basic realm=\"old\"\nwwwauth[]=\nwwwauth[]=Basic realm=\"GitHub\"\nwwwauth[]=Bearer\n",
                Description { wwwauth: list(&["Basic realm=\"GitHub\"", "Bearer"]), ..Default::default() },
            ),
            ("quit=1", b"quit=1\n", Description { quit: true, ..Default::default() }),
            ("quit=yes", b"quit=yes\n", Description { quit: true, ..Default::default() }),
            ("quit=On", b"quit=On\n", Description { quit: true, ..Default::default() }),
            ("quit=2 is true like git_config_bool", b"quit=2\n", Description { quit: true, ..Default::default() }),
            ("quit=false", b"quit=false\n", Description::default()),
            ("quit= (empty) is false", b"quit=\n", Description::default()),
            ("ephemeral=no", b"ephemeral=no\n", Description::default()),
            (
                "unknown keys and unknown multi-valued keys are ignored",
                b"colour=red\nfuture[]=x\nhost=h\n",
                Description { host: s("h"), ..Default::default() },
            ),
            (
                "unknown key with non-UTF-8 value is ignored",
                b"colour=\xff\xfe\nhost=h\n",
                Description { host: s("h"), ..Default::default() },
            ),
            (
                "lines after the blank line are not read",
                b"host=a\n\nhost=b\n",
                Description { host: s("a"), ..Default::default() },
            ),
            (
                "CRLF line endings",
                b"protocol=https\r\nhost=github.com\r\n\r\nhost=x\n",
                Description { protocol: s("https"), host: s("github.com"), ..Default::default() },
            ),
            (
                "url replaces everything read before",
                b"host=old\npassword=old\nurl=https://github.com/acme-corp/web.git\n",
                Description {
                    protocol: s("https"),
                    host: s("github.com"),
                    path: s("acme-corp/web.git"),
                    ..Default::default()
                },
            ),
            (
                "url with user, password, port, encoded path and trailing slashes",
                b"url=https://bot%40x:p%3Ass@git.example.com:8443//a%20b/c.git//\n",
                Description {
                    protocol: s("https"),
                    host: s("git.example.com:8443"),
                    path: s("a b/c.git"),
                    username: s("bot@x"),
                    password: s("p:ss"),
                    ..Default::default()
                },
            ),
            (
                "url with user only, then attributes after it",
                b"url=https://bot@github.com\nusername=other\n",
                Description {
                    protocol: s("https"),
                    host: s("github.com"),
                    username: s("other"),
                    ..Default::default()
                },
            ),
            (
                "url: an @ after the first slash belongs to the path",
                b"url=https://github.com/a@b\n",
                Description {
                    protocol: s("https"),
                    host: s("github.com"),
                    path: s("a@b"),
                    ..Default::default()
                },
            ),
        ];
        for (name, input, want) in cases {
            let got = parse(input).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn rejects_garbled_input() {
        let long_value = format!("host={}\n", "x".repeat(MAX_LINE_BYTES - 5));
        let longest_ok = format!("host={}\n", "x".repeat(MAX_LINE_BYTES - 6));
        assert!(
            parse(longest_ok.as_bytes()).is_ok(),
            "a 65,535-byte line is allowed"
        );
        let cases: Vec<(&str, Vec<u8>, ParseError)> = vec![
            (
                "line without =",
                b"protocol=https\nhost\n".to_vec(),
                ParseError::MissingEquals { line: 2 },
            ),
            (
                "over-long line",
                long_value.into_bytes(),
                ParseError::LineTooLong { line: 1 },
            ),
            (
                "NUL byte",
                b"host=a\0b\n".to_vec(),
                ParseError::Nul { line: 1 },
            ),
            (
                "CR inside a value",
                b"host=a\rb\n".to_vec(),
                ParseError::CarriageReturn {
                    line: 1,
                    key: "host",
                },
            ),
            (
                "non-UTF-8 known value",
                b"path=\xff\n".to_vec(),
                ParseError::NotUtf8 {
                    line: 1,
                    key: "path",
                },
            ),
            (
                "bad boolean",
                b"quit=maybe\n".to_vec(),
                ParseError::InvalidBool {
                    line: 1,
                    key: "quit",
                },
            ),
            (
                "url without scheme",
                b"url=github.com/a/b\n".to_vec(),
                ParseError::InvalidUrl {
                    line: 1,
                    reason: "has no scheme (expected proto://host/...)",
                },
            ),
            (
                "url with an encoded newline",
                b"url=https://github.com/a%0ab\n".to_vec(),
                ParseError::InvalidUrl {
                    line: 1,
                    reason: "contains a newline, carriage return or NUL byte in a component",
                },
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(parse(&input), Err(want), "{name}");
        }
    }

    #[test]
    fn parser_stops_at_blank_line() {
        let mut p = Parser::new();
        assert_eq!(p.feed_line(b"host=a\n"), Ok(Step::More));
        assert_eq!(p.feed_line(b"\n"), Ok(Step::End));
        assert_eq!(p.feed_line(b"garbage without equals\n"), Ok(Step::End));
        assert_eq!(p.finish().host.as_deref(), Some("a"));
    }

    #[test]
    fn encodes_in_git_order_and_round_trips() {
        let d = Description {
            capabilities: list(&["authtype", "state"]),
            authtype: s("Bearer"),
            credential: s("c"),
            ephemeral: true,
            protocol: s("https"),
            host: s("github.com"),
            path: s("a/b.git"),
            username: s("x-access-token"),
            password: s("ghs_x"),
            oauth_refresh_token: s("r"),
            password_expiry_utc: Some(1_787_403_845),
            wwwauth: list(&["Basic realm=\"GitHub\""]),
            continue_: true,
            state: list(&["botcreds:1"]),
            quit: true,
        };
        let text = String::from_utf8(d.encode().unwrap()).unwrap();
        assert_eq!(
            text,
            "capability[]=authtype\ncapability[]=state\nauthtype=Bearer\ncredential=c\nephemeral=1\n\
             protocol=https\nhost=github.com\npath=a/b.git\nusername=x-access-token\npassword=ghs_x\n\
             oauth_refresh_token=r\npassword_expiry_utc=1787403845\nwwwauth[]=Basic realm=\"GitHub\"\n\
             continue=1\nstate[]=botcreds:1\nquit=1\n"
        );
        assert_eq!(parse(text.as_bytes()).unwrap(), d);
        assert_eq!(Description::default().encode().unwrap(), b"");
    }

    #[test]
    fn refuses_to_encode_values_git_would_misread() {
        for bad in ["a\nhost=evil", "a\rb", "a\0b"] {
            let d = Description {
                password: s(bad),
                ..Default::default()
            };
            assert_eq!(
                d.encode(),
                Err(EncodeError::InvalidValue { key: "password" }),
                "{bad:?}"
            );
        }
        let d = Description {
            path: Some("p".repeat(MAX_LINE_BYTES)),
            ..Default::default()
        };
        assert_eq!(d.encode(), Err(EncodeError::LineTooLong { key: "path" }));
    }

    #[test]
    fn debug_hides_secrets() {
        let d = Description {
            password: s("ghs_secret1"),
            credential: s("secret2"),
            oauth_refresh_token: s("secret3"),
            ..Default::default()
        };
        let dbg = format!("{d:?}");
        assert!(!dbg.contains("secret"), "{dbg}");
    }
}
