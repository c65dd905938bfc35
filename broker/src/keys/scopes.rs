//! The LiteLLM key scope table (the key-provisioner design's defaults, each value overridable
//! in `[litellm.scopes.<name>]`) and the parsing of user-supplied budgets, durations and names.

use std::collections::BTreeMap;
use std::time::Duration;

use botcreds_proto::Ttl;

use super::KeyError;

/// Longest lifetime any scope may be configured with.
const MAX_LIFETIME: Duration = Duration::from_secs(366 * 86_400);
/// Largest budget any scope may be configured with (USD).
const MAX_BUDGET_USD: f64 = 1_000_000.0;
/// Longest key name (bytes).
pub const MAX_NAME_BYTES: usize = 128;

/// How a scope's budget is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetPeriod {
    /// The budget resets every day (LiteLLM `budget_duration: "1d"`).
    Day,
    /// One budget for the key's whole life.
    Run,
}

impl BudgetPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Run => "run",
        }
    }

    pub fn parse(s: &str) -> Option<BudgetPeriod> {
        match s {
            "day" => Some(BudgetPeriod::Day),
            "run" => Some(BudgetPeriod::Run),
            _ => None,
        }
    }

    /// LiteLLM's `budget_duration` for this period.
    pub fn budget_duration(self) -> Option<String> {
        match self {
            BudgetPeriod::Day => Some("1d".to_string()),
            BudgetPeriod::Run => None,
        }
    }
}

/// One scope's limits.
#[derive(Clone, Debug, PartialEq)]
pub struct ScopeSpec {
    pub name: String,
    pub budget_usd: f64,
    pub period: BudgetPeriod,
    pub rpm_limit: u32,
    pub models: Vec<String>,
    /// The longest (and default) lifetime of a key of this scope. For `workspace` it is the
    /// cap on a workspace session.
    pub lifetime: Duration,
}

/// Overrides of one scope, from `[litellm.scopes.<name>]`.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeOverride {
    pub budget_usd: Option<f64>,
    /// `day` or `run`.
    pub budget_period: Option<String>,
    pub rpm_limit: Option<u32>,
    pub models: Option<Vec<String>>,
    pub lifetime: Option<Ttl>,
}

/// Every scope, by name.
#[derive(Clone, Debug, PartialEq)]
pub struct ScopeTable {
    scopes: BTreeMap<String, ScopeSpec>,
}

const SONNET: &str = "claude-sonnet-4-5";
const HAIKU: &str = "claude-haiku-3-5";

impl Default for ScopeTable {
    /// The key-provisioner design's table.
    fn default() -> ScopeTable {
        let spec = |name: &str, budget: f64, period, rpm, models: &[&str], secs: u64| ScopeSpec {
            name: name.to_string(),
            budget_usd: budget,
            period,
            rpm_limit: rpm,
            models: models.iter().map(|m| m.to_string()).collect(),
            lifetime: Duration::from_secs(secs),
        };
        let all = [
            spec(
                "workspace",
                5.0,
                BudgetPeriod::Day,
                30,
                &[SONNET, HAIKU],
                12 * 3600,
            ),
            spec(
                "user",
                20.0,
                BudgetPeriod::Day,
                60,
                &[SONNET, HAIKU],
                30 * 86_400,
            ),
            spec("ci", 10.0, BudgetPeriod::Run, 120, &[HAIKU], 3600),
            spec("agent:review", 2.0, BudgetPeriod::Run, 60, &[HAIKU], 3600),
            spec(
                "agent:write",
                8.0,
                BudgetPeriod::Run,
                30,
                &[SONNET],
                2 * 3600,
            ),
        ];
        ScopeTable {
            scopes: all.into_iter().map(|s| (s.name.clone(), s)).collect(),
        }
    }
}

impl ScopeTable {
    /// The defaults with `overrides` applied. Errors name the key at fault
    /// (`litellm.scopes.ci.budget_usd`) and say why.
    pub fn with_overrides(
        overrides: &BTreeMap<String, ScopeOverride>,
    ) -> Result<ScopeTable, (String, String)> {
        let mut table = ScopeTable::default();
        for (name, o) in overrides {
            let key = |field: &str| format!("litellm.scopes.{name}.{field}");
            let Some(spec) = table.scopes.get_mut(name) else {
                return Err((
                    format!("litellm.scopes.{name}"),
                    format!(
                        "unknown scope; the scopes are {}",
                        botcreds_proto::litellm::LITELLM_SCOPES.join(", ")
                    ),
                ));
            };
            if let Some(b) = o.budget_usd {
                if !(b.is_finite() && b > 0.0 && b <= MAX_BUDGET_USD) {
                    return Err((
                        key("budget_usd"),
                        format!("must be a positive number of dollars up to {MAX_BUDGET_USD}"),
                    ));
                }
                spec.budget_usd = b;
            }
            if let Some(p) = &o.budget_period {
                spec.period = BudgetPeriod::parse(p).ok_or_else(|| {
                    (
                        key("budget_period"),
                        format!("{p:?} is neither \"day\" nor \"run\""),
                    )
                })?;
            }
            if let Some(r) = o.rpm_limit {
                if r == 0 {
                    return Err((key("rpm_limit"), "must be at least 1".into()));
                }
                spec.rpm_limit = r;
            }
            if let Some(models) = &o.models {
                // LiteLLM reads an empty list as "every model": never what an override means.
                if models.is_empty() || models.iter().any(|m| m.trim().is_empty()) {
                    return Err((
                        key("models"),
                        "name at least one model, and no empty names".into(),
                    ));
                }
                spec.models = models.clone();
            }
            if let Some(l) = o.lifetime {
                if l.as_duration() > MAX_LIFETIME {
                    return Err((key("lifetime"), "must be at most 366d".into()));
                }
                spec.lifetime = l.as_duration();
            }
        }
        Ok(table)
    }

    pub fn get(&self, name: &str) -> Option<&ScopeSpec> {
        self.scopes.get(name)
    }

    /// A scope named by a request, or `invalid_scope`.
    pub fn lookup(&self, name: &str) -> Result<&ScopeSpec, KeyError> {
        self.scopes.get(name).ok_or_else(|| {
            KeyError::InvalidScope(format!(
                "unknown LiteLLM scope {:?}; the scopes are {}",
                name.chars().take(64).collect::<String>(),
                botcreds_proto::litellm::LITELLM_SCOPES.join(", ")
            ))
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &ScopeSpec> {
        self.scopes.values()
    }
}

/// A requested budget: a JSON number (or a numeric string, `$` allowed), positive, at most the
/// scope's budget.
pub fn parse_budget(value: &serde_json::Value, scope: &ScopeSpec) -> Result<f64, KeyError> {
    let bad = |why: String| KeyError::InvalidBudget(why);
    let n = match value {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().trim_start_matches('$').parse::<f64>().ok(),
        _ => None,
    }
    .ok_or_else(|| bad("budget_usd must be a number of US dollars, e.g. 10".into()))?;
    if !n.is_finite() || n <= 0.0 {
        return Err(bad(format!(
            "budget_usd must be greater than zero, not {n}"
        )));
    }
    if n > scope.budget_usd {
        return Err(bad(format!(
            "budget_usd {n} exceeds the {} scope's budget of {} per {}",
            scope.name,
            scope.budget_usd,
            scope.period.as_str()
        )));
    }
    Ok(n)
}

/// A requested lifetime: like `30m` or `2h`, at most the scope's lifetime.
pub fn parse_duration(raw: &str, scope: &ScopeSpec) -> Result<Duration, KeyError> {
    let ttl: Ttl = raw
        .trim()
        .parse()
        .map_err(|e| KeyError::InvalidDuration(format!("{e}")))?;
    if ttl.as_duration() > scope.lifetime {
        return Err(KeyError::InvalidDuration(format!(
            "duration {ttl} is longer than the {} scope's lifetime of {}",
            scope.name,
            Ttl::from_secs(scope.lifetime.as_secs())
        )));
    }
    Ok(ttl.as_duration())
}

/// A key name: 1–128 bytes of letters, digits and `. _ - @ +`.
pub fn check_name(name: &str) -> Result<(), KeyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+'))
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(KeyError::InvalidKeyName(format!(
            "key name {:?} must be 1 to {MAX_NAME_BYTES} bytes of letters, digits and . _ - @ + \
                 (no \"..\")",
            name.chars().take(64).collect::<String>()
        )))
    }
}

/// Longest identity part of a key name kept as it is.
const MAX_PART: usize = 64;

/// Turn an arbitrary identity (a bot name, a login, a workspace name) into name characters,
/// without ever mapping two identities to one part: an identity that is already 1–64 name
/// characters is kept; any other (characters replaced, or cut) keeps 48 characters and gets
/// `-` and 8 hex digits of its SHA-256, so `a/b` and `a:b`, or two long names sharing their
/// first 60 characters, stay apart.
pub fn name_part(raw: &str) -> String {
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut clean = clean;
    while clean.contains("..") {
        clean = clean.replace("..", ".");
    }
    if !raw.is_empty() && clean == raw && clean.len() <= MAX_PART {
        return clean;
    }
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(raw.as_bytes()));
    let head: String = clean.chars().take(48).collect();
    let head = head.trim_end_matches('.');
    format!("{head}-{}", &digest[..8])
}

/// A scope in a key name: `agent:review` is written `agent-review` (scopes are one fixed table,
/// so this cannot collide).
pub fn scope_part(scope: &str) -> String {
    scope.replace(':', "-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use botcreds_proto::ErrorCode;
    use serde_json::json;

    #[test]
    fn defaults_are_the_design_table() {
        let t = ScopeTable::default();
        let row = |n: &str| {
            let s = t.get(n).unwrap();
            (
                s.budget_usd,
                s.period,
                s.rpm_limit,
                s.models.join(","),
                s.lifetime.as_secs(),
            )
        };
        let both = format!("{SONNET},{HAIKU}");
        assert_eq!(
            row("workspace"),
            (5.0, BudgetPeriod::Day, 30, both.clone(), 43_200)
        );
        assert_eq!(row("user"), (20.0, BudgetPeriod::Day, 60, both, 2_592_000));
        assert_eq!(
            row("ci"),
            (10.0, BudgetPeriod::Run, 120, HAIKU.into(), 3600)
        );
        assert_eq!(
            row("agent:review"),
            (2.0, BudgetPeriod::Run, 60, HAIKU.into(), 3600)
        );
        assert_eq!(
            row("agent:write"),
            (8.0, BudgetPeriod::Run, 30, SONNET.into(), 7200)
        );
        assert_eq!(
            t.iter().count(),
            botcreds_proto::litellm::LITELLM_SCOPES.len()
        );
    }

    #[test]
    fn overrides_apply_and_bad_ones_name_the_key() {
        let mut o = BTreeMap::new();
        o.insert(
            "ci".to_string(),
            ScopeOverride {
                budget_usd: Some(3.5),
                budget_period: Some("day".into()),
                models: Some(vec!["gpt-4o-mini".into()]),
                lifetime: Some(Ttl::from_secs(600)),
                rpm_limit: Some(7),
            },
        );
        let t = ScopeTable::with_overrides(&o).unwrap();
        let ci = t.get("ci").unwrap();
        assert_eq!(
            (
                ci.budget_usd,
                ci.period,
                ci.rpm_limit,
                ci.lifetime.as_secs()
            ),
            (3.5, BudgetPeriod::Day, 7, 600)
        );
        assert_eq!(t.get("user"), ScopeTable::default().get("user"));

        let bad = |name: &str, o: ScopeOverride| {
            let mut m = BTreeMap::new();
            m.insert(name.to_string(), o);
            ScopeTable::with_overrides(&m).unwrap_err().0
        };
        assert_eq!(bad("nope", ScopeOverride::default()), "litellm.scopes.nope");
        let neg = ScopeOverride {
            budget_usd: Some(-1.0),
            ..Default::default()
        };
        assert_eq!(bad("ci", neg), "litellm.scopes.ci.budget_usd");
        let period = ScopeOverride {
            budget_period: Some("week".into()),
            ..Default::default()
        };
        assert_eq!(bad("ci", period), "litellm.scopes.ci.budget_period");
        let models = ScopeOverride {
            models: Some(vec![]),
            ..Default::default()
        };
        assert_eq!(bad("user", models), "litellm.scopes.user.models");
        let rpm = ScopeOverride {
            rpm_limit: Some(0),
            ..Default::default()
        };
        assert_eq!(bad("user", rpm), "litellm.scopes.user.rpm_limit");
    }

    #[test]
    fn budgets() {
        let t = ScopeTable::default();
        let ci = t.get("ci").unwrap();
        assert_eq!(parse_budget(&json!(10), ci).unwrap(), 10.0);
        assert_eq!(parse_budget(&json!("2.5"), ci).unwrap(), 2.5);
        assert_eq!(parse_budget(&json!("$3"), ci).unwrap(), 3.0);
        for bad in [
            json!(-1),
            json!(0),
            json!("ten"),
            json!(null),
            json!([1]),
            json!(10.01),
        ] {
            let e = parse_budget(&bad, ci).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidBudget, "{bad}");
        }
    }

    #[test]
    fn durations() {
        let t = ScopeTable::default();
        let ci = t.get("ci").unwrap();
        assert_eq!(parse_duration("30m", ci).unwrap().as_secs(), 1800);
        assert_eq!(parse_duration("1h", ci).unwrap().as_secs(), 3600);
        for bad in ["2h", "soon", "", "-1h", "0s"] {
            let e = parse_duration(bad, ci).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidDuration, "{bad}");
        }
    }

    #[test]
    fn names() {
        for good in [
            "github-actions-main",
            "alice@example.com-cli",
            "a.b_c+d",
            "x",
        ] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(129);
        for bad in ["", "a b", "a/b", "..", "a..b", "ключ", long.as_str()] {
            assert_eq!(
                check_name(bad).unwrap_err().code(),
                ErrorCode::InvalidKeyName,
                "{bad}"
            );
        }
        assert_eq!(scope_part("agent:write"), "agent-write");
        assert_eq!(name_part("review-bot"), "review-bot");
        assert_eq!(name_part("alice@example.com"), "alice@example.com");
        assert_ne!(name_part("a/b"), name_part("a:b"));
        let long = "x".repeat(70);
        assert_ne!(name_part(&long), name_part(&format!("{long}y")));
        assert!(name_part(&long).len() <= 57);
        assert!(check_name(&name_part("weird name/..//")).is_ok());
        assert!(check_name(&name_part(".....")).is_ok());
    }
}
