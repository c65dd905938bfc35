//! `botcreds keys list|create|revoke|rotate`: LiteLLM virtual keys through the broker's admin
//! routes (`/v1/keys`), printed like the key-provisioner design's table, or as JSON.

use botcreds_proto::litellm::{IssuedKey, KeyList, KeyRevoked, KeySummary, ServiceKeyRequest};
use clap::Subcommand;

use super::client::{BrokerClient, CliError, Table, exit, print_json};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Every key the broker issued (active, expired and revoked ones of the last week).
    List {
        #[arg(long)]
        json: bool,
        /// The broker's URL (default: BOTCREDS_BROKER).
        #[arg(long)]
        broker: Option<String>,
    },
    /// Create a key: `botcreds keys create ci --name github-actions-main --budget 10 --duration 1h`.
    Create {
        /// user, ci, agent:review or agent:write.
        scope: String,
        #[arg(long)]
        name: String,
        /// US dollars, at most the scope's budget (the default).
        #[arg(long)]
        budget: Option<String>,
        /// Lifetime like 30m or 2h, at most the scope's (the default).
        #[arg(long)]
        duration: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        broker: Option<String>,
    },
    /// Revoke a key by name: it is deleted in LiteLLM at once.
    Revoke {
        #[arg(long)]
        name: String,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        broker: Option<String>,
    },
    /// Rotate a key by name: a new key under the same name; the old one is revoked.
    Rotate {
        #[arg(long)]
        name: String,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        broker: Option<String>,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::new(exit::FAILURE, format!("starting the async runtime: {e}")))
}

/// A key name as one path segment (names are letters, digits and `. _ - @ +`; anything else
/// is escaped so it reaches the broker, which refuses it with a clear error).
fn segment(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"._-@+".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `$5/day`, `$2.5/run`.
pub fn budget_cell(usd: f64, period: &str) -> String {
    format!("${usd}/{period}")
}

/// `2026-02-06T22:00Z` from `2026-02-06T22:00:00Z`.
pub fn expires_cell(rfc3339: &str) -> String {
    match (rfc3339.get(..16), rfc3339.ends_with('Z')) {
        (Some(minute), true) => format!("{minute}Z"),
        _ => rfc3339.to_string(),
    }
}

/// The design's table: SCOPE NAME BUDGET RPM EXPIRES STATUS.
pub fn render_list(keys: &[KeySummary]) -> String {
    let mut t = Table::new(["SCOPE", "NAME", "BUDGET", "RPM", "EXPIRES", "STATUS"]);
    for k in keys {
        t.row([
            k.scope.clone(),
            k.name.clone(),
            budget_cell(k.budget_usd, &k.budget_period),
            k.rpm_limit.to_string(),
            expires_cell(&k.expires_at),
            k.status.as_str().to_string(),
        ]);
    }
    t.render()
}

fn render_created(k: &IssuedKey) -> String {
    let what = match k.scope.as_str() {
        "ci" => "CI key".to_string(),
        "user" => "User key".to_string(),
        s if s.starts_with("agent:") => "Agent key".to_string(),
        s => format!("{s} key"),
    };
    format!(
        "✓ {what} created\nKey:     {}\nName:    {}\nScope:   {}\nBudget:  {}\nExpires: {}\n",
        k.key,
        k.name,
        k.scope,
        budget_cell(k.budget_usd, &k.budget_period),
        k.expires_at
    )
}

/// Run `botcreds keys ...`.
pub fn run(command: KeysCommand) -> Result<(), CliError> {
    let rt = runtime()?;
    match command {
        KeysCommand::List { json, broker } => {
            let client = BrokerClient::from_args(broker)?;
            let list: KeyList = rt.block_on(client.get("/v1/keys"))?;
            if json {
                return print_json(&list);
            }
            if list.keys.is_empty() {
                println!("no keys");
            } else {
                print!("{}", render_list(&list.keys));
            }
        }
        KeysCommand::Create {
            scope,
            name,
            budget,
            duration,
            json,
            broker,
        } => {
            let client = BrokerClient::from_args(broker)?;
            let budget_usd = budget.map(|b| {
                b.trim()
                    .trim_start_matches('$')
                    .parse::<f64>()
                    .ok()
                    .and_then(|n| serde_json::Number::from_f64(n).map(serde_json::Value::Number))
                    // Not a number: sent as typed so the broker answers invalid_budget.
                    .unwrap_or(serde_json::Value::String(b))
            });
            let body = ServiceKeyRequest {
                scope: Some(scope),
                name: Some(name),
                budget_usd,
                duration,
            };
            let k: IssuedKey = rt.block_on(client.post("/v1/keys", &body))?;
            if json {
                return print_json(&k);
            }
            print!("{}", render_created(&k));
        }
        KeysCommand::Revoke { name, json, broker } => {
            let client = BrokerClient::from_args(broker)?;
            let r: KeyRevoked =
                rt.block_on(client.delete(&format!("/v1/keys/{}", segment(&name))))?;
            if json {
                return print_json(&r);
            }
            println!("✓ Key \"{}\" revoked", r.name);
        }
        KeysCommand::Rotate { name, json, broker } => {
            let client = BrokerClient::from_args(broker)?;
            let k: IssuedKey = rt.block_on(client.post(
                &format!("/v1/keys/{}/rotate", segment(&name)),
                &serde_json::json!({}),
            ))?;
            if json {
                return print_json(&k);
            }
            println!(
                "✓ Key \"{}\" rotated\nOld key revoked\nNew key: {}",
                k.name, k.key
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use botcreds_proto::litellm::KeyStatus;

    fn summary(
        scope: &str,
        name: &str,
        budget: f64,
        period: &str,
        rpm: u32,
        status: KeyStatus,
    ) -> KeySummary {
        KeySummary {
            name: name.into(),
            scope: scope.into(),
            status,
            budget_usd: budget,
            budget_period: period.into(),
            rpm_limit: rpm,
            models: vec![],
            created_at: "2026-02-06T14:00:00Z".into(),
            expires_at: "2026-02-06T22:00:00Z".into(),
            revoked_at: None,
            credential_id: "lk_1".into(),
            created_by: "key-provisioner".into(),
            bot: None,
            workspace_id: None,
        }
    }

    #[test]
    fn list_looks_like_the_design() {
        let text = render_list(&[
            summary(
                "workspace",
                "contractor-alice",
                5.0,
                "day",
                30,
                KeyStatus::Active,
            ),
            summary(
                "agent:write",
                "code-gen-bot",
                8.0,
                "run",
                30,
                KeyStatus::Expired,
            ),
        ]);
        assert_eq!(
            text,
            "SCOPE        NAME              BUDGET  RPM  EXPIRES            STATUS\n\
             workspace    contractor-alice  $5/day  30   2026-02-06T22:00Z  active\n\
             agent:write  code-gen-bot      $8/run  30   2026-02-06T22:00Z  expired\n"
        );
        assert_eq!(budget_cell(2.5, "run"), "$2.5/run");
    }

    #[test]
    fn names_are_one_segment() {
        assert_eq!(segment("alice@example.com-cli"), "alice@example.com-cli");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
    }
}
