//! `[[litellm]]` entries of `agent.toml`: which LiteLLM virtual key this host wants and where
//! the agent writes it (key file, env file, Roo Code and OpenCode settings), validated strictly
//! so that a bad entry stops the agent at startup with the key named (`litellm[0].mode`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use botcreds_proto::Ttl;
use botcreds_proto::litellm::{LITELLM_SCOPES, WorkspaceInfo};
use serde::Deserialize;

use crate::peer::lookup_group;

/// Default `refresh_fraction`: refresh once a quarter of the key's lifetime remains.
pub const DEFAULT_REFRESH_FRACTION: f64 = 0.25;
/// Default `check_interval`: how often the agent asks the broker whether the key it holds is
/// still the current one (a revocation or rotation shows up as a different key).
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// Default `on_change_timeout`.
pub const DEFAULT_ON_CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_ON_CHANGE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default mode of every file an entry writes: only the agent's user can read the key.
pub const DEFAULT_MODE: u32 = 0o600;
const MAX_REASON_BYTES: usize = 1024;
const MAX_FIELD_BYTES: usize = 256;

/// One validated `[[litellm]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct LitellmEntry {
    /// `workspace`, `user`, `ci`, `agent:review` or `agent:write`.
    pub scope: String,
    /// The Coder workspace the key serves (scope `workspace` only, where it is required).
    pub workspace: Option<WorkspaceInfo>,
    pub reason: Option<String>,
    /// The key and a newline.
    pub key_file: PathBuf,
    /// `LITELLM_API_KEY=...` and the base URL, for `source` or systemd's `EnvironmentFile=`.
    pub env_file: Option<PathBuf>,
    /// Roo Code's settings (`~/.config/roo-code/settings.json`), merged.
    pub roo_code: Option<PathBuf>,
    /// OpenCode's configuration (`~/.config/opencode/config.json`), merged.
    pub opencode: Option<PathBuf>,
    /// The model the tool configs select; default: the existing choice, else the key's first model.
    pub model: Option<String>,
    /// Mode of every file written (0600 unless a group may read it: 0640).
    pub mode: u32,
    /// Group given to every file written.
    pub group: Option<u32>,
    /// Command (argv) run after the files changed.
    pub on_change: Option<Vec<String>>,
    pub on_change_timeout: Duration,
    /// Refresh once this fraction of the key's lifetime remains (unless `refresh_before`).
    pub refresh_fraction: f64,
    /// Refresh once this much of the key's lifetime remains (at most half of it).
    pub refresh_before: Option<Duration>,
    pub check_interval: Duration,
    /// Revoke the key at the broker when the agent stops.
    pub release_on_stop: bool,
}

impl LitellmEntry {
    /// What identifies the key this entry holds across restarts: its scope and workspace.
    /// Output paths are not part of it, so moving a file does not cost the cached key.
    pub fn identity(&self) -> String {
        format!(
            "litellm scope={} workspace={}",
            self.scope,
            self.workspace
                .as_ref()
                .map_or("-", |w| w.workspace_id.as_str())
        )
    }

    /// Every file the entry writes, with its key name in `agent.toml`.
    pub fn outputs(&self) -> Vec<(&'static str, &Path)> {
        let mut out = vec![("key_file", self.key_file.as_path())];
        if let Some(p) = &self.env_file {
            out.push(("env_file", p));
        }
        if let Some(p) = &self.roo_code {
            out.push(("roo_code", p));
        }
        if let Some(p) = &self.opencode {
            out.push(("opencode", p));
        }
        out
    }
}

/// `[[litellm]]` as written in `agent.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLitellm {
    scope: String,
    key_file: PathBuf,
    env_file: Option<PathBuf>,
    roo_code: Option<PathBuf>,
    opencode: Option<PathBuf>,
    model: Option<String>,
    mode: Option<String>,
    group: Option<String>,
    on_change: Option<Vec<String>>,
    on_change_timeout: Option<Ttl>,
    refresh_fraction: Option<f64>,
    refresh_before: Option<Ttl>,
    check_interval: Option<Ttl>,
    release_on_stop: Option<bool>,
    reason: Option<String>,
    workspace: Option<WorkspaceInfo>,
}

/// Validates every entry; an error names the key (`litellm[1].key_file`) and says why.
pub fn validate_entries(raw: Vec<RawLitellm>) -> Result<Vec<LitellmEntry>, (String, String)> {
    let mut entries = Vec::with_capacity(raw.len());
    let mut identities = BTreeSet::new();
    let mut paths: Vec<(PathBuf, String)> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let at = |key: &str| format!("litellm[{i}]{key}");
        let entry = validate(r).map_err(|(key, m)| (at(&key), m))?;
        if !identities.insert(entry.identity()) {
            return Err((
                at(".scope"),
                format!(
                    "another [[litellm]] entry already asks for a {} key{}; write several outputs in one entry instead",
                    entry.scope,
                    entry.workspace.as_ref().map_or(String::new(), |w| format!(
                        " for workspace {}",
                        w.workspace_id
                    ))
                ),
            ));
        }
        for (key, path) in entry.outputs() {
            if let Some((_, other)) = paths.iter().find(|(p, _)| p == path) {
                return Err((
                    at(&format!(".{key}")),
                    format!("{} is already written as {other}", path.display()),
                ));
            }
            paths.push((path.to_path_buf(), at(&format!(".{key}"))));
        }
        entries.push(entry);
    }
    Ok(entries)
}

fn validate(raw: RawLitellm) -> Result<LitellmEntry, (String, String)> {
    let err = |key: &str, m: String| (key.to_string(), m);
    if !LITELLM_SCOPES.contains(&raw.scope.as_str()) {
        return Err(err(
            ".scope",
            format!(
                "{:?} is not a LiteLLM scope (one of {})",
                raw.scope,
                LITELLM_SCOPES.join(", ")
            ),
        ));
    }
    let workspace = match (raw.scope.as_str(), raw.workspace) {
        ("workspace", None) => {
            return Err(err(
                ".workspace",
                "scope \"workspace\" needs the workspace it serves: workspace = { workspace_id = ..., \
                 workspace_name = ..., coder_user = ..., coder_user_id = ... }"
                    .into(),
            ));
        }
        ("workspace", Some(w)) => {
            for (field, value) in [
                ("workspace_id", &w.workspace_id),
                ("workspace_name", &w.workspace_name),
                ("coder_user", &w.coder_user),
                ("coder_user_id", &w.coder_user_id),
            ] {
                if value.trim().is_empty()
                    || value.len() > MAX_FIELD_BYTES
                    || value.chars().any(char::is_control)
                {
                    return Err(err(
                        &format!(".workspace.{field}"),
                        format!(
                            "must be non-empty, at most {MAX_FIELD_BYTES} bytes, without control characters"
                        ),
                    ));
                }
            }
            Some(w)
        }
        (_, Some(_)) => {
            return Err(err(
                ".workspace",
                format!(
                    "only scope \"workspace\" keys carry a workspace, not {:?}",
                    raw.scope
                ),
            ));
        }
        (_, None) => None,
    };
    if let Some(reason) = &raw.reason
        && (reason.len() > MAX_REASON_BYTES || reason.chars().any(char::is_control))
    {
        return Err(err(
            ".reason",
            format!("must be at most {MAX_REASON_BYTES} bytes without control characters"),
        ));
    }
    for (key, path) in [
        (".key_file", Some(&raw.key_file)),
        (".env_file", raw.env_file.as_ref()),
        (".roo_code", raw.roo_code.as_ref()),
        (".opencode", raw.opencode.as_ref()),
    ] {
        if let Some(path) = path {
            check_output_path(path).map_err(|m| err(key, m))?;
        }
    }
    if let Some(model) = &raw.model
        && (model.is_empty()
            || model.len() > MAX_FIELD_BYTES
            || model.chars().any(|c| c.is_control() || c.is_whitespace()))
    {
        return Err(err(
            ".model",
            format!("{model:?} is not a model name (non-empty, no whitespace)"),
        ));
    }
    let mode = match &raw.mode {
        None => DEFAULT_MODE,
        Some(text) => parse_mode(text).map_err(|m| err(".mode", m))?,
    };
    let group = match &raw.group {
        None => None,
        Some(name) => match lookup_group(name) {
            Ok(Some(group)) => Some(group.gid),
            Ok(None) => return Err(err(".group", format!("no such group {name:?}"))),
            Err(e) => return Err(err(".group", format!("looking up {name:?}: {e}"))),
        },
    };
    if group.is_some() && mode & 0o060 == 0 {
        return Err(err(
            ".group",
            format!(
                "the files get group {:?} but mode {mode:04o} gives the group no access; use mode = \"0640\"",
                raw.group.as_deref().unwrap_or_default()
            ),
        ));
    }
    let on_change = match raw.on_change {
        None => None,
        Some(argv) if argv.is_empty() || argv[0].is_empty() => {
            return Err(err(
                ".on_change",
                "names no command; write on_change = [\"/path/to/program\", \"arg\", ...]".into(),
            ));
        }
        Some(argv) if argv.iter().any(|a| a.contains('\0')) => {
            return Err(err(".on_change", "an argument contains a NUL byte".into()));
        }
        Some(argv) => Some(argv),
    };
    let on_change_timeout = raw
        .on_change_timeout
        .map_or(DEFAULT_ON_CHANGE_TIMEOUT, Ttl::as_duration);
    if on_change_timeout > MAX_ON_CHANGE_TIMEOUT {
        return Err(err(
            ".on_change_timeout",
            format!(
                "{} is longer than 10m",
                Ttl::from_secs(on_change_timeout.as_secs())
            ),
        ));
    }
    let refresh_fraction = raw.refresh_fraction.unwrap_or(DEFAULT_REFRESH_FRACTION);
    if !(refresh_fraction > 0.0 && refresh_fraction <= 0.5) {
        return Err(err(
            ".refresh_fraction",
            format!(
                "{refresh_fraction} must be above 0 and at most 0.5 (refresh once this fraction of the key's life remains)"
            ),
        ));
    }
    if raw.refresh_fraction.is_some() && raw.refresh_before.is_some() {
        return Err(err(
            ".refresh_before",
            "set refresh_before or refresh_fraction, not both".into(),
        ));
    }
    let release_on_stop = raw.release_on_stop.unwrap_or(raw.scope == "workspace");
    Ok(LitellmEntry {
        scope: raw.scope,
        workspace,
        reason: raw.reason,
        key_file: raw.key_file,
        env_file: raw.env_file,
        roo_code: raw.roo_code,
        opencode: raw.opencode,
        model: raw.model,
        mode,
        group,
        on_change,
        on_change_timeout,
        refresh_fraction,
        refresh_before: raw.refresh_before.map(Ttl::as_duration),
        check_interval: raw
            .check_interval
            .map_or(DEFAULT_CHECK_INTERVAL, Ttl::as_duration),
        release_on_stop,
    })
}

fn check_output_path(path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!("{} must be an absolute path", path.display()));
    }
    if path.file_name().is_none() || path.as_os_str().to_string_lossy().ends_with('/') {
        return Err(format!("{} must name a file", path.display()));
    }
    Ok(())
}

/// `"0600"`, `"600"`, `"0640"`: the owner reads and writes, the group may read (or write),
/// others get nothing, and nothing is executable.
fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    let mode = u32::from_str_radix(digits, 8)
        .ok()
        .filter(|_| !digits.is_empty() && digits.len() <= 4)
        .ok_or_else(|| format!("{text:?} is not an octal file mode like \"0600\" or \"0640\""))?;
    if mode & !0o660 != 0 || mode & 0o600 != 0o600 {
        return Err(format!(
            "{text:?}: a key file must be readable and writable by its owner, never by others, \
             and not executable (0600, 0640 or 0660)"
        ));
    }
    Ok(mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<LitellmEntry>, String> {
        #[derive(Deserialize)]
        struct Doc {
            litellm: Vec<RawLitellm>,
        }
        let doc: Doc = toml::from_str(text).map_err(|e| e.to_string())?;
        validate_entries(doc.litellm).map_err(|(k, m)| format!("{k}: {m}"))
    }

    #[test]
    fn defaults_and_full_entry() {
        let e = parse("[[litellm]]\nscope = \"user\"\nkey_file = \"/run/k\"\n").unwrap();
        let e = &e[0];
        assert_eq!(e.mode, 0o600);
        assert_eq!(e.refresh_fraction, DEFAULT_REFRESH_FRACTION);
        assert_eq!(e.check_interval, DEFAULT_CHECK_INTERVAL);
        assert!(!e.release_on_stop, "only workspace keys default to release");
        assert_eq!(e.outputs().len(), 1);

        let e = parse(
            r#"
[[litellm]]
scope = "workspace"
key_file = "/home/u/.config/litellm/key"
env_file = "/home/u/.config/litellm/env"
roo_code = "/home/u/.config/roo-code/settings.json"
opencode = "/home/u/.config/opencode/config.json"
model = "claude-haiku-3-5"
mode = "0640"
group = "root"
on_change = ["/usr/bin/true", "x"]
on_change_timeout = "5s"
refresh_before = "2h"
check_interval = "30s"
reason = "workspace tools"
[litellm.workspace]
workspace_id = "ws-abc123"
workspace_name = "contractor-alice"
coder_user = "alice"
coder_user_id = "usr-def456"
"#,
        )
        .unwrap();
        let e = &e[0];
        assert_eq!((e.mode, e.group), (0o640, Some(0)));
        assert!(e.release_on_stop);
        assert_eq!(e.refresh_before, Some(Duration::from_secs(7200)));
        assert_eq!(e.outputs().len(), 4);
        assert_eq!(e.identity(), "litellm scope=workspace workspace=ws-abc123");
        assert_eq!(e.workspace.as_ref().unwrap().coder_user, "alice");
    }

    #[test]
    fn errors_name_the_key() {
        let ws = "[litellm.workspace]\nworkspace_id = \"w\"\nworkspace_name = \"n\"\ncoder_user = \"u\"\ncoder_user_id = \"i\"\n";
        let entry = |extra: &str| format!("[[litellm]]\nkey_file = \"/k\"\n{extra}\n");
        let cases: Vec<(String, &str)> = vec![
            (
                entry("scope = \"team\""),
                "litellm[0].scope: \"team\" is not a LiteLLM scope",
            ),
            (
                "[[litellm]]\nscope = \"user\"\n".into(),
                "missing field `key_file`",
            ),
            (
                entry("scope = \"user\"\ncolour = 1"),
                "unknown field `colour`",
            ),
            (
                entry("scope = \"workspace\""),
                "litellm[0].workspace: scope \"workspace\" needs",
            ),
            (
                format!(
                    "{}{}",
                    entry("scope = \"workspace\""),
                    ws.replace("\"u\"", "\"\"")
                ),
                "litellm[0].workspace.coder_user: must be non-empty",
            ),
            (
                format!(
                    "{}[litellm.workspace]\nworkspace_id = \"w\"\n",
                    entry("scope = \"workspace\"")
                ),
                "missing field `workspace_name`",
            ),
            (
                format!("{}{ws}", entry("scope = \"ci\"")),
                "litellm[0].workspace: only scope \"workspace\"",
            ),
            (
                "[[litellm]]\nscope = \"user\"\nkey_file = \"rel/key\"\n".into(),
                "litellm[0].key_file: rel/key must be an absolute path",
            ),
            (
                entry("scope = \"user\"\nenv_file = \"env\""),
                "litellm[0].env_file: env must be an absolute path",
            ),
            (
                entry("scope = \"user\"\nroo_code = \"/\""),
                "litellm[0].roo_code: / must name a file",
            ),
            (
                entry("scope = \"user\"\nmode = \"0644\""),
                "litellm[0].mode: \"0644\": a key file must be",
            ),
            (
                entry("scope = \"user\"\nmode = \"0700\""),
                "litellm[0].mode",
            ),
            (
                entry("scope = \"user\"\nmode = \"rw\""),
                "not an octal file mode",
            ),
            (
                entry("scope = \"user\"\nmode = \"0400\""),
                "litellm[0].mode",
            ),
            (
                entry("scope = \"user\"\ngroup = \"no-such-group-xyz\""),
                "litellm[0].group: no such group",
            ),
            (
                entry("scope = \"user\"\ngroup = \"root\""),
                "litellm[0].group: the files get group",
            ),
            (
                entry("scope = \"user\"\non_change = []"),
                "litellm[0].on_change: names no command",
            ),
            (
                entry("scope = \"user\"\non_change_timeout = \"1h\""),
                "litellm[0].on_change_timeout",
            ),
            (
                entry("scope = \"user\"\nrefresh_fraction = 0.9"),
                "litellm[0].refresh_fraction: 0.9 must be",
            ),
            (
                entry("scope = \"user\"\nrefresh_fraction = 0.0"),
                "litellm[0].refresh_fraction",
            ),
            (
                entry("scope = \"user\"\nrefresh_fraction = 0.2\nrefresh_before = \"1h\""),
                "not both",
            ),
            (
                entry("scope = \"user\"\nrefresh_before = \"soon\""),
                "duration \"soon\"",
            ),
            (
                entry("scope = \"user\"\ncheck_interval = \"-1m\""),
                "check_interval",
            ),
            (
                entry("scope = \"user\"\nmodel = \"two words\""),
                "litellm[0].model",
            ),
            (
                entry("scope = \"user\"\nreason = \"a\\nb\""),
                "litellm[0].reason",
            ),
            (
                format!(
                    "{}{}",
                    entry("scope = \"user\""),
                    entry("scope = \"user\"").replace("/k", "/k2")
                ),
                "litellm[1].scope: another [[litellm]] entry already asks for a user key",
            ),
            (
                format!(
                    "{}{}",
                    entry("scope = \"user\""),
                    entry("scope = \"ci\"\nenv_file = \"/k\"")
                        .replace("key_file = \"/k\"", "key_file = \"/k3\"")
                ),
                "litellm[1].env_file: /k is already written as litellm[0].key_file",
            ),
        ];
        for (text, want) in cases {
            match parse(&text) {
                Ok(_) => panic!("accepted:\n{text}"),
                Err(e) => assert!(e.contains(want), "{text}\n=> {e}\nwant {want:?}"),
            }
        }
    }

    #[test]
    fn modes() {
        for (text, want) in [
            ("0600", Some(0o600)),
            ("600", Some(0o600)),
            ("0o640", Some(0o640)),
            ("0660", Some(0o660)),
            ("0644", None),
            ("0610", None),
            ("0200", None),
            ("", None),
            ("06400", None),
            ("9", None),
        ] {
            assert_eq!(parse_mode(text).ok(), want, "{text:?}");
        }
    }
}
