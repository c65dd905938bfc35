//! The admin CLI over the tailnet: `pending`, `approve`, `deny`, `log`, `revoke`,
//! `grants list`, `bots list`, `policy show|forget`, `completions`. Tables for people,
//! `--json` for scripts; exit codes as in [`super::client::exit`] (docs/approvals.md).

use std::process::ExitCode;

use botcreds_proto::approval::{
    ApprovalList, ApprovalRequestView, ApproveAllAnswer, ApproveAllBody, ApproveBody, AuditList,
    BotList, DecisionAnswer, DenyBody, GrantList, PolicyView, RememberedRuleView, RevokeAnswer,
    RevokeBody,
};
use clap::{Args, Subcommand};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::client::{BrokerClient, CliError, Progress, Table, exit, print_json};

/// Which broker to talk to.
#[derive(Args, Debug, Clone, Default)]
pub struct Conn {
    /// The broker's URL, e.g. http://botcreds.example.ts.net:8443 (or set BOTCREDS_BROKER).
    /// Authentication is the tailnet identity of this machine, or BOTCREDS_API_KEY.
    #[arg(long)]
    pub broker: Option<String>,
    /// Print the broker's JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Top-level admin commands (flattened into `botcreds`).
#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// List pending approval requests.
    Pending {
        /// Only this bot's.
        #[arg(long)]
        bot: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Approve a pending request, or with --bot=NAME --all every pending request of a bot.
    Approve {
        /// The request id (apr_...).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Also remember: add an auto_approve rule for this bot and resource.
        #[arg(long)]
        persist: bool,
        /// With an id: refuse unless the request is this bot's. With --all: whose to approve.
        #[arg(long)]
        bot: Option<String>,
        /// Approve every pending request of --bot.
        #[arg(long, requires = "bot")]
        all: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Deny a pending request.
    Deny {
        /// The request id (apr_...).
        id: String,
        /// Shown to the bot (at most 4 KiB).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// The audit log.
    Log {
        /// How far back (24h, 7d) or since when (RFC 3339).
        #[arg(long, default_value = "24h")]
        since: String,
        #[arg(long)]
        bot: Option<String>,
        /// Only this kind of event (approval_granted, credential_issued, ...).
        #[arg(long)]
        event: Option<String>,
        /// At most this many events (default 1000).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Revoke a live credential (by id), everything of a bot, or everything reaching a repo:
    /// kills the tokens at GitHub and ends the grants that would refresh them.
    Revoke {
        /// The credential id (tok_..., dk_... or lk_...).
        #[arg(required_unless_present_any = ["bot", "repo"], conflicts_with_all = ["bot", "repo"])]
        credential_id: Option<String>,
        #[arg(long, conflicts_with = "repo")]
        bot: Option<String>,
        /// owner/name.
        #[arg(long)]
        repo: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Grants created by approvals.
    Grants {
        #[command(subcommand)]
        command: GrantsCommand,
    },
    /// The policy's bots.
    Bots {
        #[command(subcommand)]
        command: BotsCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum GrantsCommand {
    /// Live grants (with --all also revoked and expired ones).
    List {
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand, Debug)]
pub enum BotsCommand {
    /// Every bot with its rule counts, pending requests and grants.
    List {
        #[command(flatten)]
        conn: Conn,
    },
}

/// `botcreds policy show`.
#[derive(Args, Debug)]
pub struct PolicyShowArgs {
    #[command(flatten)]
    pub conn: Conn,
}

/// `botcreds policy forget RULE_ID`.
#[derive(Args, Debug)]
pub struct PolicyForgetArgs {
    /// The remembered rule's id (rem_...), as `policy show` lists it.
    pub rule_id: String,
    #[command(flatten)]
    pub conn: Conn,
}

/// Run an admin command; prints its output or error and returns the exit code.
pub fn run(command: AdminCommand) -> ExitCode {
    finish(block_on(execute(command)))
}

pub fn run_policy_show(args: PolicyShowArgs) -> ExitCode {
    finish(block_on(policy_show(args.conn)))
}

pub fn run_policy_forget(args: PolicyForgetArgs) -> ExitCode {
    finish(block_on(policy_forget(args.conn, args.rule_id)))
}

/// Write shell completions for `cmd` to stdout.
pub fn completions(shell: clap_complete::Shell, cmd: &mut clap::Command) -> ExitCode {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, cmd, name, &mut std::io::stdout());
    ExitCode::SUCCESS
}

fn finish(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("botcreds: {e}");
            e.exit_code()
        }
    }
}

fn block_on<F: std::future::Future<Output = Result<(), CliError>>>(f: F) -> Result<(), CliError> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::new(exit::FAILURE, format!("starting the runtime: {e}")))?;
    runtime.block_on(f)
}

/// A request with a progress line while it waits.
async fn waiting<T, F: std::future::Future<Output = Result<T, CliError>>>(
    what: &str,
    f: F,
) -> Result<T, CliError> {
    let _progress = Progress::start(what);
    f.await
}

/// Percent-encode a query value or path segment.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn execute(command: AdminCommand) -> Result<(), CliError> {
    match command {
        AdminCommand::Pending { bot, conn } => pending(conn, bot).await,
        AdminCommand::Approve {
            id,
            persist,
            bot,
            all,
            conn,
        } => match (id, all, bot) {
            (_, true, Some(bot)) => approve_all(conn, bot, persist).await,
            (Some(id), false, bot) => approve(conn, id, persist, bot).await,
            _ => Err(CliError::usage("name a request id, or --bot=NAME --all")),
        },
        AdminCommand::Deny { id, reason, conn } => deny(conn, id, reason).await,
        AdminCommand::Log {
            since,
            bot,
            event,
            limit,
            conn,
        } => log(conn, since, bot, event, limit).await,
        AdminCommand::Revoke {
            credential_id,
            bot,
            repo,
            conn,
        } => {
            revoke(
                conn,
                RevokeBody {
                    credential_id,
                    bot,
                    repo,
                },
            )
            .await
        }
        AdminCommand::Grants {
            command: GrantsCommand::List { all, conn },
        } => grants(conn, all).await,
        AdminCommand::Bots {
            command: BotsCommand::List { conn },
        } => bots(conn).await,
    }
}

fn client(conn: &Conn) -> Result<BrokerClient, CliError> {
    BrokerClient::from_args(conn.broker.clone())
}

fn parse(t: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(t, &Rfc3339).ok()
}

/// `3m`, `2h`, `4d`: how long ago (or until) `t` is.
fn span(from: OffsetDateTime, to: OffsetDateTime) -> String {
    let secs = (to - from).whole_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h{}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{}h", secs / 86_400, (secs % 86_400) / 3600),
    }
}

fn age(t: &str) -> String {
    parse(t).map_or_else(|| "?".into(), |t| span(t, OffsetDateTime::now_utc()))
}

fn until(t: &str) -> String {
    parse(t).map_or_else(|| "?".into(), |t| span(OffsetDateTime::now_utc(), t))
}

fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

async fn pending(conn: Conn, bot: Option<String>) -> Result<(), CliError> {
    let c = client(&conn)?;
    let path = match &bot {
        Some(b) => format!("/v1/admin/approvals?bot={}", enc(b)),
        None => "/v1/admin/approvals".to_string(),
    };
    let list: ApprovalList = waiting("asking the broker", c.get(&path)).await?;
    if conn.json {
        return print_json(&list);
    }
    if list.requests.is_empty() {
        println!("no pending approval requests");
        return Ok(());
    }
    print!("{}", requests_table(&list.requests));
    Ok(())
}

fn requests_table(requests: &[ApprovalRequestView]) -> Table {
    let mut t = Table::new(["ID", "BOT", "RESOURCE", "REASON", "AGE", "EXPIRES IN"]);
    for r in requests {
        t.row([
            r.request_id.clone(),
            r.bot.clone().unwrap_or_else(|| format!("({})", r.caller)),
            short(&r.resource.summary(), 60),
            short(r.reason.as_deref().unwrap_or("-"), 40),
            age(&r.created_at),
            until(&r.expires_at),
        ]);
    }
    t
}

fn print_decision(d: &DecisionAnswer) {
    let r = &d.request;
    let bot = r.bot.as_deref().unwrap_or("-");
    println!(
        "{} {} ({}, {})",
        r.request_id,
        r.state,
        bot,
        r.resource.summary()
    );
    if let Some(g) = &d.grant {
        println!("  grant {} until {}", g.grant_id, g.expires_at);
    }
    if let Some(rule) = &d.remembered {
        println!(
            "  remembered as rule {} (botcreds policy forget {} removes it)",
            rule.rule_id, rule.rule_id
        );
    }
    if let Some(reason) = &r.deny_reason {
        println!("  reason: {reason}");
    }
}

async fn approve(
    conn: Conn,
    id: String,
    persist: bool,
    bot: Option<String>,
) -> Result<(), CliError> {
    let c = client(&conn)?;
    let body = ApproveBody { persist, bot };
    let d: DecisionAnswer = waiting(
        "approving",
        c.post(&format!("/v1/admin/approvals/{}/approve", enc(&id)), &body),
    )
    .await?;
    if conn.json {
        return print_json(&d);
    }
    print_decision(&d);
    Ok(())
}

async fn approve_all(conn: Conn, bot: String, persist: bool) -> Result<(), CliError> {
    let c = client(&conn)?;
    let body = ApproveAllBody {
        bot: bot.clone(),
        persist,
    };
    let answer: ApproveAllAnswer = waiting(
        "approving",
        c.post("/v1/admin/approvals/approve-all", &body),
    )
    .await?;
    if conn.json {
        return print_json(&answer);
    }
    if answer.approved.is_empty() {
        println!("no pending approval requests of {bot}");
    }
    for d in &answer.approved {
        print_decision(d);
    }
    Ok(())
}

async fn deny(conn: Conn, id: String, reason: Option<String>) -> Result<(), CliError> {
    let c = client(&conn)?;
    let body = DenyBody { reason, bot: None };
    let d: DecisionAnswer = waiting(
        "denying",
        c.post(&format!("/v1/admin/approvals/{}/deny", enc(&id)), &body),
    )
    .await?;
    if conn.json {
        return print_json(&d);
    }
    print_decision(&d);
    Ok(())
}

async fn log(
    conn: Conn,
    since: String,
    bot: Option<String>,
    event: Option<String>,
    limit: Option<usize>,
) -> Result<(), CliError> {
    let c = client(&conn)?;
    let mut path = format!("/v1/admin/audit?since={}", enc(&since));
    if let Some(b) = &bot {
        path.push_str(&format!("&bot={}", enc(b)));
    }
    if let Some(e) = &event {
        path.push_str(&format!("&event={}", enc(e)));
    }
    if let Some(l) = limit {
        path.push_str(&format!("&limit={l}"));
    }
    let list: AuditList = waiting("reading the audit log", c.get(&path)).await?;
    if conn.json {
        return print_json(&list);
    }
    if list.events.is_empty() {
        println!("no audit events");
        return Ok(());
    }
    let mut t = Table::new(["TIME", "EVENT", "BOT", "BY", "SUBJECT", "DETAIL"]);
    for e in &list.events {
        let subject = e
            .request_id
            .clone()
            .or_else(|| e.token_id.clone())
            .or_else(|| e.repo.clone())
            .unwrap_or_else(|| e.repositories.join(","));
        let detail = e
            .code
            .clone()
            .or_else(|| e.detail.clone())
            .or_else(|| e.approval.clone())
            .unwrap_or_default();
        t.row([
            e.timestamp.clone(),
            e.event.as_str().to_string(),
            e.bot.clone().unwrap_or_else(|| "-".into()),
            short(e.caller.as_deref().unwrap_or("-"), 40),
            short(&subject, 40),
            short(&detail, 60),
        ]);
    }
    print!("{t}");
    Ok(())
}

async fn revoke(conn: Conn, body: RevokeBody) -> Result<(), CliError> {
    let c = client(&conn)?;
    let answer: RevokeAnswer = waiting("revoking", c.post("/v1/admin/revoke", &body)).await?;
    if conn.json {
        return print_json(&answer);
    }
    if answer.revoked.is_empty() {
        println!("no live credentials to revoke");
    } else {
        let mut t = Table::new(["CREDENTIAL", "REPOSITORIES", "HOLDERS", "AT GITHUB"]);
        for r in &answer.revoked {
            t.row([
                r.credential_id.clone(),
                short(&r.repositories.join(","), 50),
                r.holders.join(","),
                if r.revoked_upstream {
                    "revoked".to_string()
                } else {
                    format!("FAILED: {}", r.error.as_deref().unwrap_or("unknown"))
                },
            ]);
        }
        print!("{t}");
    }
    if answer.grants_ended.is_empty() {
        println!("no grants ended");
    } else {
        println!("grants ended: {}", answer.grants_ended.join(", "));
    }
    if answer.revoked.iter().any(|r| !r.revoked_upstream) {
        return Err(CliError::new(
            exit::BROKER,
            "GitHub did not confirm every revocation; the broker no longer hands those \
             tokens out, but they may live until they expire",
        ));
    }
    Ok(())
}

async fn grants(conn: Conn, all: bool) -> Result<(), CliError> {
    let c = client(&conn)?;
    let path = if all {
        "/v1/admin/grants?all=true"
    } else {
        "/v1/admin/grants"
    };
    let list: GrantList = waiting("asking the broker", c.get(path)).await?;
    if conn.json {
        return print_json(&list);
    }
    if list.grants.is_empty() {
        println!("no grants");
        return Ok(());
    }
    let mut t = Table::new([
        "GRANT",
        "BOT",
        "RESOURCE",
        "REQUEST",
        "APPROVED BY",
        "EXPIRES IN",
        "STATE",
    ]);
    for g in &list.grants {
        let state = match (&g.revoked_at, parse(&g.expires_at)) {
            (Some(_), _) => "revoked",
            (None, Some(t)) if t <= OffsetDateTime::now_utc() => "expired",
            _ => "live",
        };
        t.row([
            g.grant_id.clone(),
            g.bot.clone().unwrap_or_else(|| format!("({})", g.caller)),
            short(&g.resource.summary(), 50),
            g.request_id.clone(),
            g.approved_by.clone(),
            until(&g.expires_at),
            state.to_string(),
        ]);
    }
    print!("{t}");
    Ok(())
}

async fn bots(conn: Conn) -> Result<(), CliError> {
    let c = client(&conn)?;
    let list: BotList = waiting("asking the broker", c.get("/v1/admin/bots")).await?;
    if conn.json {
        return print_json(&list);
    }
    let mut t = Table::new([
        "BOT",
        "IDENTITY",
        "APPROVAL TIMEOUT",
        "AUTO",
        "APPROVAL",
        "DENY",
        "REMEMBERED",
        "PENDING",
        "GRANTS",
    ]);
    for b in &list.bots {
        t.row([
            b.name.clone(),
            b.identity.clone(),
            b.approval_timeout.clone(),
            b.auto_approve.to_string(),
            b.requires_approval.to_string(),
            b.deny.to_string(),
            b.remembered.to_string(),
            b.pending.to_string(),
            b.grants.to_string(),
        ]);
    }
    print!("{t}");
    Ok(())
}

async fn policy_show(conn: Conn) -> Result<(), CliError> {
    let c = client(&conn)?;
    let view: PolicyView = waiting("asking the broker", c.get("/v1/admin/policy")).await?;
    if conn.json {
        return print_json(&view);
    }
    print!("{}", render_policy(&view));
    Ok(())
}

/// `policy show` for people: each bot's rules in order of evaluation, remembered rules
/// marked as such.
pub fn render_policy(view: &PolicyView) -> String {
    let mut out = format!(
        "policy {}\ndefaults: requires_approval={}, approval_timeout={}\n",
        view.path, view.defaults_requires_approval, view.defaults_approval_timeout
    );
    for b in &view.bots {
        out.push_str(&format!("\nbot {} ({})", b.name, b.identity));
        if let Some(t) = &b.approval_timeout {
            out.push_str(&format!(", approval_timeout {t}"));
        }
        out.push('\n');
        for (i, r) in b.deny.iter().enumerate() {
            out.push_str(&format!("  deny[{i}]               {r}\n"));
        }
        for (i, r) in b.auto_approve.iter().enumerate() {
            out.push_str(&format!("  auto_approve[{i}]       {r}\n"));
        }
        for r in view.remembered.iter().filter(|r| r.bot == b.name) {
            out.push_str(&format!(
                "  auto_approve {} {} (remembered: approved by {} on {}, from {})\n",
                r.rule_id,
                r.resource.summary(),
                r.created_by,
                r.created_at,
                r.request_id
            ));
        }
        for (i, r) in b.requires_approval.iter().enumerate() {
            out.push_str(&format!("  requires_approval[{i}]  {r}\n"));
        }
    }
    let orphans: Vec<&RememberedRuleView> = view
        .remembered
        .iter()
        .filter(|r| !view.bots.iter().any(|b| b.name == r.bot))
        .collect();
    if !orphans.is_empty() {
        out.push_str("\nremembered rules of bots no longer in the policy:\n");
        for r in orphans {
            out.push_str(&format!(
                "  {} {} {} (remembered)\n",
                r.rule_id,
                r.bot,
                r.resource.summary()
            ));
        }
    }
    out
}

async fn policy_forget(conn: Conn, rule_id: String) -> Result<(), CliError> {
    let c = client(&conn)?;
    let rule: RememberedRuleView = waiting(
        "forgetting",
        c.delete(&format!("/v1/admin/policy/remembered/{}", enc(&rule_id))),
    )
    .await?;
    if conn.json {
        return print_json(&rule);
    }
    println!(
        "forgot remembered rule {} ({} {})",
        rule.rule_id,
        rule.bot,
        rule.resource.summary()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_encoding() {
        let t = OffsetDateTime::UNIX_EPOCH;
        assert_eq!(span(t, t + time::Duration::seconds(59)), "59s");
        assert_eq!(span(t, t + time::Duration::seconds(150)), "2m");
        assert_eq!(span(t, t + time::Duration::seconds(3600 * 3 + 120)), "3h2m");
        assert_eq!(span(t + time::Duration::seconds(5), t), "0s");
        assert_eq!(enc("acme/web x"), "acme%2Fweb%20x");
        assert_eq!(short("abcdef", 4), "abc…");
    }
}
