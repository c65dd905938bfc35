//! Table-driven tests of the policy engine: caller matching, decisions, and load errors with
//! their positions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use botcreds_proto::{Permission, RepoName};

use super::*;
use crate::caller::{Caller, CallerVia, TailnetIdentity};

const POLICY: &str = r#"
bots:
  machina-bot:
    identity: { type: tailnet, hostname: machina-bot }
    approval_timeout: 2h
    auto_approve:
      - repo: "myorg/repo-a"
        permissions: [contents:write, issues:write, pull_requests:write]
      - repo: "myorg/repo-b"
        permissions: [contents:read]
      - litellm_scope: "agent:write"
      - repo: "myorg/admin-*"
        permissions: [admin, contents:read]
    requires_approval:
      - permissions: [admin]
      - repo: "myorg/sensitive-*"
      - litellm_scope: "*"
    deny:
      - repo: "myorg/infrastructure"
      - repo: "*/infra"
        permissions: [contents:write]
      - repo: "myorg/repo-a"
        permissions: [pull_requests:write]
      - litellm_scope: workspace
  ci-bot:
    identity: { tag: "tag:ci" }
    auto_approve:
      - repo: "MyOrg/*"
        permissions: [contents:read, metadata:read]
  ci-bot-shadowed:
    identity: { type: tailnet, tag: "tag:ci" }
  late-bot:
    identity: { tag: "tag:late" }
  alice-laptop:
    identity: { user: "Alice@Example.com" }
  cap-bot:
    identity: { type: tailnet, capability: "example.com/cap/botcreds" }
  fqdn-bot:
    identity: { type: tailnet, hostname: "build-01.tail3f9c2.ts.net." }
  key-bot:
    identity: { type: api_key }
    auto_approve:
      - repo: "myorg/repo-a"
        permissions: [contents:read]
  every-repo:
    identity: { type: api_key }
    auto_approve:
      - repo: "*/*"
        permissions: [metadata:read]
defaults:
  requires_approval: true
  approval_timeout: 24h
"#;

fn policy() -> Policy {
    Policy::parse("policy.yaml", POLICY).unwrap()
}

fn addr() -> SocketAddr {
    "100.64.0.7:41000".parse().unwrap()
}

/// A tailnet node as WhoIs would describe it.
struct Node<'a> {
    name: &'a str,
    fqdn: &'a str,
    tags: &'a [&'a str],
    login: &'a str,
    caps: &'a [&'a str],
    /// Shared in from, or named in, another tailnet.
    foreign: bool,
}

const NODE: Node<'static> = Node {
    name: "somebody",
    fqdn: "somebody.tail3f9c2.ts.net",
    tags: &[],
    login: "mallory@example.com",
    caps: &[],
    foreign: false,
};

fn tailnet(n: Node<'_>) -> Caller {
    Caller {
        address: addr(),
        via: CallerVia::Tailnet(TailnetIdentity {
            stable_id: "nTEST".into(),
            node_name: n.fqdn.into(),
            computed_name: n.name.into(),
            tags: n.tags.iter().map(|t| t.to_string()).collect(),
            login: n.login.into(),
            capabilities: n
                .caps
                .iter()
                .map(|c| (c.to_string(), vec![]))
                .collect::<BTreeMap<_, _>>(),
            foreign: n.foreign,
            own_node: false,
        }),
    }
}

fn api_key(bot: &str) -> Caller {
    Caller {
        address: addr(),
        via: CallerVia::ApiKey { bot: bot.into() },
    }
}

fn repos(names: &[&str]) -> Vec<RepoName> {
    names.iter().map(|n| n.parse().unwrap()).collect()
}

fn perms(names: &[&str]) -> Vec<Permission> {
    names.iter().map(|n| n.parse().unwrap()).collect()
}

#[test]
fn policy_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Policy>();
}

#[test]
fn caller_to_bot() {
    let p = policy();
    let tagged = "tagged-devices";
    #[rustfmt::skip]
    let cases: Vec<(&str, Caller, Option<&str>)> = vec![
        ("hostname", tailnet(Node { name: "machina-bot", fqdn: "machina-bot.tail3f9c2.ts.net", ..NODE }), Some("machina-bot")),
        ("hostname any case", tailnet(Node { name: "Machina-Bot", ..NODE }), Some("machina-bot")),
        ("fqdn rule, node name", tailnet(Node { name: "build-01", fqdn: "build-01.tail3f9c2.ts.net", ..NODE }), Some("fqdn-bot")),
        ("fqdn rule, trailing dot", tailnet(Node { name: "x", fqdn: "BUILD-01.tail3f9c2.ts.net.", ..NODE }), Some("fqdn-bot")),
        ("short name of fqdn rule is not enough", tailnet(Node { name: "build-01", fqdn: "build-01.other.ts.net", ..NODE }), None),
        // hostname_matches_shared_in_node: a node of another tailnet may carry a bot's short name.
        ("short name of a foreign node", tailnet(Node { name: "machina-bot", fqdn: "machina-bot.other.ts.net", foreign: true, ..NODE }), None),
        ("short name of a shared-in node", tailnet(Node { name: "machina-bot.other.ts.net", fqdn: "machina-bot.other.ts.net", foreign: true, ..NODE }), None),
        ("fqdn rule names a foreign node exactly", tailnet(Node { name: "x", fqdn: "build-01.tail3f9c2.ts.net", foreign: true, ..NODE }), Some("fqdn-bot")),
        ("foreign tagged node still matches by tag", tailnet(Node { name: "machina-bot", tags: &["tag:ci"], login: tagged, foreign: true, ..NODE }), Some("ci-bot")),
        ("tag", tailnet(Node { tags: &["tag:ci"], login: tagged, ..NODE }), Some("ci-bot")),
        ("hostname beats tag", tailnet(Node { name: "machina-bot", tags: &["tag:ci"], login: tagged, ..NODE }), Some("machina-bot")),
        ("tag ties go to file order", tailnet(Node { tags: &["tag:late", "tag:ci"], login: tagged, ..NODE }), Some("ci-bot")),
        ("later tag alone", tailnet(Node { tags: &["tag:late"], login: tagged, ..NODE }), Some("late-bot")),
        ("tags are exact", tailnet(Node { tags: &["tag:CI"], login: tagged, ..NODE }), None),
        ("user", tailnet(Node { login: "alice@example.com", ..NODE }), Some("alice-laptop")),
        ("user any case", tailnet(Node { login: "ALICE@example.COM", ..NODE }), Some("alice-laptop")),
        ("user beats capability", tailnet(Node { login: "alice@example.com", caps: &["example.com/cap/botcreds"], ..NODE }), Some("alice-laptop")),
        ("user never matches a tagged node", tailnet(Node { tags: &["tag:other"], login: "alice@example.com", ..NODE }), None),
        ("capability", tailnet(Node { caps: &["example.com/cap/other", "example.com/cap/botcreds"], ..NODE }), Some("cap-bot")),
        ("tag beats capability", tailnet(Node { tags: &["tag:ci"], login: tagged, caps: &["example.com/cap/botcreds"], ..NODE }), Some("ci-bot")),
        ("tagged node, capability", tailnet(Node { tags: &["tag:other"], login: tagged, caps: &["example.com/cap/botcreds"], ..NODE }), Some("cap-bot")),
        ("unknown node", tailnet(NODE), None),
        ("empty names match nothing", tailnet(Node { name: "", fqdn: "", login: "", ..NODE }), None),
        ("api key", api_key("key-bot"), Some("key-bot")),
        ("api key for a tailnet bot", api_key("machina-bot"), None),
        ("api key, unknown bot", api_key("nobody"), None),
    ];
    for (what, caller, want) in cases {
        assert_eq!(p.bot_for(&caller), want, "{what}");
    }
}

/// hostname_enrollment_for_renamed_node: only identities a node cannot choose for itself
/// allow token-less enrollment.
#[test]
fn identities_assigned_by_the_tailnet() {
    let p = policy();
    for (bot, want) in [
        ("machina-bot", false),
        ("fqdn-bot", false),
        ("ci-bot", true),
        ("alice-laptop", true),
        ("cap-bot", true),
        ("key-bot", false),
        ("nobody", false),
    ] {
        assert_eq!(p.identity_is_assigned(bot), want, "{bot}");
    }
}

#[test]
fn decisions() {
    use Outcome::*;
    let p = policy();
    let machina = Some("machina-bot");
    let ci = Some("ci-bot");
    // (what, bot, repositories, permissions, outcome, rule)
    type Case<'a> = (
        &'a str,
        Option<&'a str>,
        &'a [&'a str],
        &'a [&'a str],
        Outcome,
        &'a str,
    );
    #[rustfmt::skip]
    let cases: &[Case<'_>] = &[
        ("listed repo and permission", machina, &["myorg/repo-a"], &["contents:write"], Allow, "bots.machina-bot.auto_approve[0]"),
        ("write covers read", machina, &["myorg/repo-a"], &["contents:read", "issues:write"], Allow, "bots.machina-bot.auto_approve[0]"),
        ("read does not cover write", machina, &["myorg/repo-b"], &["contents:write"], RequireApproval, "defaults"),
        ("one permission outside the rule", machina, &["myorg/repo-a"], &["contents:write", "actions:read"], RequireApproval, "defaults"),
        ("repos split across two rules", machina, &["myorg/repo-a", "myorg/repo-b"], &["contents:read"], RequireApproval, "defaults"),
        ("deny by repo", machina, &["myorg/infrastructure"], &["contents:read"], Deny, "bots.machina-bot.deny[0]"),
        ("deny if any repo matches", machina, &["myorg/repo-a", "myorg/infrastructure"], &["contents:read"], Deny, "bots.machina-bot.deny[0]"),
        ("deny glob */infra and permission", machina, &["acme/infra"], &["contents:write"], Deny, "bots.machina-bot.deny[1]"),
        ("deny permission at a higher level", machina, &["acme/infra"], &["workflows:write", "contents:write"], Deny, "bots.machina-bot.deny[1]"),
        ("deny permission not reached", machina, &["acme/infra"], &["contents:read"], RequireApproval, "defaults"),
        ("*/x is one segment", machina, &["acme/infra-2"], &["contents:write"], RequireApproval, "defaults"),
        ("deny beats auto_approve", machina, &["myorg/repo-a"], &["pull_requests:write"], Deny, "bots.machina-bot.deny[2]"),
        ("admin keyword in requires_approval", machina, &["myorg/repo-a"], &["administration:write"], RequireApproval, "bots.machina-bot.requires_approval[0]"),
        ("admin keyword: admin level", machina, &["myorg/repo-b"], &["organization_projects:admin"], RequireApproval, "bots.machina-bot.requires_approval[0]"),
        ("administration:read is not admin", machina, &["myorg/repo-b"], &["administration:read"], RequireApproval, "defaults"),
        ("admin keyword in auto_approve", machina, &["myorg/admin-tools"], &["administration:write", "contents:read"], Allow, "bots.machina-bot.auto_approve[3]"),
        ("admin keyword covers only admin", machina, &["myorg/admin-tools"], &["administration:write", "issues:write"], RequireApproval, "bots.machina-bot.requires_approval[0]"),
        ("glob sensitive-*", machina, &["myorg/sensitive-db"], &["contents:read"], RequireApproval, "bots.machina-bot.requires_approval[1]"),
        ("glob is case-insensitive", machina, &["MyOrg/Sensitive-DB"], &["contents:read"], RequireApproval, "bots.machina-bot.requires_approval[1]"),
        ("every repository meets repo deny", machina, &[], &["contents:read"], Deny, "bots.machina-bot.deny[0]"),
        ("every permission meets permission rules", machina, &["myorg/repo-b"], &[], RequireApproval, "bots.machina-bot.requires_approval[0]"),
        ("rule glob upper-case", ci, &["myorg/anything"], &["contents:read", "metadata:read"], Allow, "bots.ci-bot.auto_approve[0]"),
        ("other owner", ci, &["other/anything"], &["contents:read"], RequireApproval, "defaults"),
        ("every permission is never auto", ci, &["myorg/x"], &[], RequireApproval, "defaults"),
        ("every repository needs */*", ci, &[], &["contents:read"], RequireApproval, "defaults"),
        ("*/* covers every repository", Some("every-repo"), &[], &["metadata:read"], Allow, "bots.every-repo.auto_approve[0]"),
        ("unknown bot", None, &["myorg/repo-a"], &["contents:read"], RequireApproval, "defaults"),
        ("unknown bot name", Some("ghost"), &["myorg/repo-a"], &["contents:read"], RequireApproval, "defaults"),
    ];
    for &(what, bot, r, q, outcome, rule) in cases {
        let (r, q) = (repos(r), perms(q));
        let request = Request::Github {
            repositories: &r,
            permissions: &q,
        };
        let d = p.decide_for_bot(bot, &request);
        assert_eq!(
            (d.outcome, d.rule.as_str()),
            (outcome, rule),
            "{what}: {}",
            d.explanation
        );
        let known = bot.filter(|b| p.has_bot(b));
        assert_eq!(d.bot.as_deref(), known, "{what}");
    }
}

#[test]
fn litellm_decisions() {
    use Outcome::*;
    let p = policy();
    let cases = [
        (
            "auto scope",
            "machina-bot",
            "agent:write",
            Allow,
            "bots.machina-bot.auto_approve[2]",
        ),
        (
            "deny scope",
            "machina-bot",
            "workspace",
            Deny,
            "bots.machina-bot.deny[3]",
        ),
        (
            "approval glob *",
            "machina-bot",
            "agent:review",
            RequireApproval,
            "bots.machina-bot.requires_approval[2]",
        ),
        (
            "github rules ignore litellm",
            "ci-bot",
            "agent:write",
            RequireApproval,
            "defaults",
        ),
    ];
    for (what, bot, scope, outcome, rule) in cases {
        let d = p.decide_for_bot(Some(bot), &Request::Litellm { scope });
        assert_eq!(
            (d.outcome, d.rule.as_str()),
            (outcome, rule),
            "{what}: {}",
            d.explanation
        );
    }
}

#[test]
fn decide_matches_caller_then_rules() {
    let p = policy();
    let r = repos(&["myorg/infrastructure"]);
    let q = perms(&["contents:read"]);
    let request = Request::Github {
        repositories: &r,
        permissions: &q,
    };
    let d = p.decide(
        &tailnet(Node {
            name: "machina-bot",
            ..NODE
        }),
        &request,
    );
    assert_eq!(d.outcome, Outcome::Deny);
    assert_eq!(d.bot.as_deref(), Some("machina-bot"));
    assert_eq!(d.rule, "bots.machina-bot.deny[0]");
    assert_eq!(
        d.explanation,
        "repository myorg/infrastructure matches deny pattern myorg/infrastructure, so the request is denied"
    );
    assert_eq!(d.approval_timeout, Duration::from_secs(2 * 3600));

    let d = p.decide(&tailnet(NODE), &request);
    assert_eq!(
        (d.outcome, d.bot.as_deref(), d.rule.as_str()),
        (Outcome::RequireApproval, None, "defaults")
    );
    assert_eq!(
        d.explanation,
        "the caller matches no bot of the policy; defaults.requires_approval is true, so a human must approve"
    );
}

#[test]
fn explanations() {
    let p = policy();
    let explain = |bot: &str, r: &[&str], q: &[&str]| {
        let (r, q) = (repos(r), perms(q));
        p.decide_for_bot(
            Some(bot),
            &Request::Github {
                repositories: &r,
                permissions: &q,
            },
        )
        .explanation
    };
    assert_eq!(
        explain("machina-bot", &["myorg/repo-a"], &["contents:read"]),
        "auto_approve rule myorg/repo-a [contents:write, issues:write, pull_requests:write] covers every requested repository and permission, so it is allowed"
    );
    assert_eq!(
        explain("machina-bot", &["acme/infra"], &["contents:write"]),
        "repository acme/infra matches deny pattern */infra and permission contents:write matches deny permission contents:write, so the request is denied"
    );
    assert_eq!(
        explain("machina-bot", &["myorg/repo-a"], &["administration:write"]),
        "permission administration:write matches requires_approval permission admin, so a human must approve"
    );
    assert_eq!(
        explain("ci-bot", &["other/x"], &["contents:read"]),
        "no rule of bot ci-bot matched; defaults.requires_approval is true, so a human must approve"
    );
    let d = p.decide_for_bot(
        Some("machina-bot"),
        &Request::Litellm { scope: "workspace" },
    );
    assert_eq!(
        d.explanation,
        "LiteLLM scope workspace matches deny scope workspace, so the request is denied"
    );
}

#[test]
fn defaults_and_timeouts() {
    let r = repos(&["myorg/x"]);
    let q = perms(&["contents:read"]);
    let request = Request::Github {
        repositories: &r,
        permissions: &q,
    };
    let bots = "bots:\n  b:\n    identity: {tag: \"tag:b\"}\n";
    let cases = [
        // (yaml, outcome for bot b and for an unknown bot, default timeout)
        (
            format!("{bots}defaults:\n  requires_approval: false\n"),
            Outcome::Deny,
            24 * 3600,
        ),
        (
            format!("{bots}defaults:\n  requires_approval: true\n  approval_timeout: 30m\n"),
            Outcome::RequireApproval,
            1800,
        ),
        (bots.to_string(), Outcome::RequireApproval, 24 * 3600),
        (String::new(), Outcome::RequireApproval, 24 * 3600),
        (
            "# nothing but a comment\n".to_string(),
            Outcome::RequireApproval,
            24 * 3600,
        ),
        (
            "bots:\ndefaults:\n".to_string(),
            Outcome::RequireApproval,
            24 * 3600,
        ),
    ];
    for (yaml, outcome, secs) in cases {
        let p = Policy::parse("p.yaml", &yaml).unwrap();
        for bot in [Some("b"), None] {
            let d = p.decide_for_bot(bot, &request);
            assert_eq!(
                (d.outcome, d.rule.as_str()),
                (outcome, "defaults"),
                "{yaml:?} {bot:?}"
            );
            assert_eq!(d.approval_timeout, Duration::from_secs(secs), "{yaml:?}");
            assert_eq!(
                p.approval_timeout_for(bot),
                Duration::from_secs(secs),
                "{yaml:?}"
            );
        }
    }
    let denied = Policy::parse(
        "p.yaml",
        &format!("{bots}defaults:\n  requires_approval: false\n"),
    )
    .unwrap();
    assert_eq!(
        denied.decide_for_bot(Some("b"), &request).explanation,
        "no rule of bot b matched; defaults.requires_approval is false, so the request is denied"
    );

    let p = policy();
    assert_eq!(
        p.approval_timeout_for(Some("machina-bot")),
        Duration::from_secs(7200)
    );
    assert_eq!(
        p.approval_timeout_for(Some("ci-bot")),
        DEFAULT_APPROVAL_TIMEOUT
    );
    assert_eq!(
        p.approval_timeout_for(Some("ghost")),
        DEFAULT_APPROVAL_TIMEOUT
    );
    assert_eq!(p.approval_timeout_for(None), DEFAULT_APPROVAL_TIMEOUT);
}

#[test]
fn names_and_identities() {
    let p = policy();
    assert_eq!(
        p.bot_names(),
        [
            "machina-bot",
            "ci-bot",
            "ci-bot-shadowed",
            "late-bot",
            "alice-laptop",
            "cap-bot",
            "fqdn-bot",
            "key-bot",
            "every-repo"
        ]
    );
    assert!(p.has_bot("cap-bot"));
    assert!(!p.has_bot("Cap-Bot"));
    let cases = [
        ("machina-bot", Some("tailnet hostname machina-bot")),
        (
            "fqdn-bot",
            Some("tailnet hostname build-01.tail3f9c2.ts.net"),
        ),
        ("ci-bot", Some("tailnet tag tag:ci")),
        (
            "alice-laptop",
            Some("tailnet user alice@example.com (untagged nodes)"),
        ),
        (
            "cap-bot",
            Some("tailnet capability example.com/cap/botcreds"),
        ),
        ("key-bot", Some("API key configured for this bot")),
        ("ghost", None),
    ];
    for (bot, want) in cases {
        assert_eq!(p.identity_of(bot).as_deref(), want, "{bot}");
    }
    let debug = format!("{:?}", Policy::parse("p", "").unwrap());
    assert!(debug.starts_with("Policy { bots: 0,"), "{debug}");
}

/// Each bad policy, the position of the error, and a piece of its message.
/// A client certificate is the bot it names; `{type: mtls}` bots match nothing else.
#[test]
fn mtls_identity_matches_by_bot_name() {
    let p = Policy::parse(
        "p.yaml",
        "bots:\n  cert-bot:\n    identity: {type: mtls}\n  key-bot:\n    identity: {type: api_key}\n",
    )
    .unwrap();
    let cert = |bot: &str| Caller {
        address: addr(),
        via: CallerVia::Mtls {
            bot: bot.into(),
            serial: "40ab".into(),
            admin: false,
        },
    };
    assert_eq!(p.bot_for(&cert("cert-bot")), Some("cert-bot"));
    // A certificate names its bot whatever identity the policy gives that bot.
    assert_eq!(p.bot_for(&cert("key-bot")), Some("key-bot"));
    assert_eq!(p.bot_for(&cert("nobody")), None);
    assert_eq!(p.bot_for(&api_key("cert-bot")), None);
}

#[test]
fn load_errors() {
    let head = "bots:\n  a:\n    identity: {hostname: a}\n";
    #[rustfmt::skip]
    let cases: Vec<(String, u64, u64, &str)> = vec![
        (format!("{head}    auto_approve:\n      - repo: myorg/x\n        permissions: [contents:write, content:read]\n"), 6, 39, "unknown permission \"content:read\": not a GitHub App permission"),
        (format!("{head}    deny:\n      - permissions: [contents:owner]\n"), 5, 23, "unknown level"),
        (format!("{head}    deny:\n      - permissions: [workflows:read]\n"), 5, 23, "has no level read"),
        (format!("{head}    deny:\n      - repo: \"my org/x\"\n"), 5, 15, "bad repository pattern"),
        (format!("{head}    deny:\n      - repo: a/b/c\n"), 5, 15, "exactly one '/'"),
        (format!("{head}    deny:\n      - repo: myorg\n"), 5, 15, "owner/name"),
        ("bots:\n  a:\n    identity: {hostname: a}\n  a:\n    identity: {hostname: b}\n".into(), 4, 3, "duplicate"),
        (format!("{head}    auto_aprove: []\n"), 4, 5, "unknown field `auto_aprove`"),
        ("bots: {}\ndefault:\n  requires_approval: false\n".into(), 2, 1, "unknown field `default`"),
        (format!("{head}    deny:\n      - repo: x/y\n        permission: [contents:read]\n"), 6, 9, "unknown field `permission`"),
        (format!("{head}    deny:\n      - permissions: 5\n"), 5, 22, "expected a list"),
        ("bots: [a, b]\n".into(), 1, 7, "expected a mapping"),
        ("defaults:\n  requires_approval: maybe\n".into(), 2, 22, "invalid boolean"),
        (format!("{head}    approval_timeout: soon\n"), 4, 23, "approval_timeout: duration \"soon\""),
        (format!("{head}    approval_timeout: 0s\n"), 4, 23, "greater than zero"),
        ("defaults:\n  approval_timeout: 1y\n".into(), 2, 21, "approval_timeout"),
        ("bots:\n  a:\n    identity: {type: mtls, cn: a}\n".into(), 3, 28, "unknown identity field `cn`"),
        ("bots:\n  a:\n    identity: {type: mtls, tag: \"tag:a\"}\n".into(), 3, 28, "an mtls identity takes no tag"),
        ("bots:\n  a:\n    identity: {type: x509}\n".into(), 3, 22, "expected tailnet, api_key or mtls"),
        (format!("{head}    requires_approval:\n      - {{}}\n"), 5, 9, "empty requires_approval rule"),
        (format!("{head}    deny:\n      - permissions: []\n"), 5, 22, "permissions is empty"),
        (format!("{head}    auto_approve:\n      - repo: myorg/x\n"), 5, 9, "needs both repo and permissions"),
        (format!("{head}    auto_approve:\n      - permissions: [contents:read]\n"), 5, 9, "needs both repo and permissions"),
        (format!("{head}    auto_approve:\n      - litellm_scope: agent:write\n        repo: myorg/x\n"), 5, 24, "cannot also name repo"),
        (format!("{head}    auto_approve:\n      - litellm_scope: agent:wirte\n"), 5, 24, "unknown LiteLLM scope"),
        ("bots:\n  a:\n    identity: {hostname: a, tag: \"tag:x\"}\n".into(), 3, 29, "both hostname and tag"),
        ("bots:\n  a:\n    identity: {host: a}\n".into(), 3, 16, "unknown identity field `host`"),
        ("bots:\n  a:\n    identity: {type: ssh}\n".into(), 3, 22, "unknown identity type `ssh`"),
        ("bots:\n  a:\n    identity: {type: api_key, hostname: a}\n".into(), 3, 31, "api_key identity takes no hostname"),
        ("bots:\n  a:\n    identity: {type: tailnet}\n".into(), 3, 15, "needs one of hostname"),
        ("bots:\n  a:\n    identity: {}\n".into(), 3, 15, "or type: api_key"),
        ("bots:\n  a:\n    auto_approve: []\n".into(), 3, 5, "missing field `identity`"),
        ("bots:\n  bad name:\n    identity: {tag: \"tag:x\"}\n".into(), 2, 3, "bot name \"bad name\""),
        ("bots:\n  a:\n    identity: {tag: ci}\n".into(), 3, 21, "must look like tag:name"),
        ("bots:\n  a:\n    identity: {user: alice}\n".into(), 3, 22, "tailnet login"),
        ("bots:\n  a:\n    identity: {hostname: \"a b\"}\n".into(), 3, 26, "not a DNS name"),
        (format!("{head}    deny:\n      - permissions: [contents:read\n"), 5, 22, "unclosed"),
        ("bots: {}\n---\nbots: {}\n".into(), 3, 1, "single YAML document"),
    ];
    let mut wrong = Vec::new();
    for (yaml, line, column, fragment) in cases {
        let err = match Policy::parse("policy.yaml", &yaml) {
            Ok(_) => panic!("accepted:\n{yaml}"),
            Err(e) => e,
        };
        let at = format!("policy.yaml:{line}:{column}: ");
        if !err.to_string().starts_with(&at) || !err.message.contains(fragment) {
            wrong.push(format!("want {at}...{fragment}...\n got {err}\n{yaml}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn size_limit() {
    let yaml = format!("# {}\nbots: {{}}\n", "x".repeat(100));
    let err = Policy::parse_with_limit("big.yaml", &yaml, 64).unwrap_err();
    assert_eq!(
        err.to_string(),
        "big.yaml:0:0: policy is larger than the 64-byte limit"
    );
    assert!(Policy::parse_with_limit("big.yaml", &yaml, 1024).is_ok());
    let huge = "#".repeat(MAX_POLICY_BYTES + 1);
    let err = Policy::parse("huge.yaml", &huge).unwrap_err();
    assert_eq!(err.message, "policy is larger than the 16 MiB limit");
}

#[test]
fn load_from_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, POLICY).unwrap();
    let p = Policy::load(&path).unwrap();
    assert!(p.has_bot("machina-bot"));

    std::fs::write(&path, "bots:\n  a:\n    identity: {type: x509}\n").unwrap();
    let err = Policy::load(&path).unwrap_err();
    assert_eq!(err.file, path.display().to_string());
    assert_eq!((err.line, err.column), (3, 22));

    std::fs::write(&path, "#".repeat(2000)).unwrap();
    let err = Policy::load_with_limit(&path, 1000).unwrap_err();
    assert_eq!(
        (err.line, err.message.as_str()),
        (0, "policy is larger than the 1000-byte limit")
    );

    std::fs::write(&path, b"bots: {}\n# \xff\n").unwrap();
    let err = Policy::load(&path).unwrap_err();
    assert!(err.message.contains("not UTF-8"), "{err}");

    let err = Policy::load(&dir.path().join("missing.yaml")).unwrap_err();
    assert_eq!((err.line, err.column), (0, 0));
    assert!(err.message.starts_with("cannot open policy"), "{err}");
}

const DEPLOY_KEY_POLICY: &str = r#"
bots:
  b:
    identity: { type: api_key }
    auto_approve:
      - repo: "myorg/*"
        permissions: [contents:write]
      - kind: deploy_key
        repo: "myorg/keys-*"
        permissions: [contents:read]
    requires_approval:
      - kind: deploy_key
        repo: "myorg/ask-*"
    deny:
      - repo: "myorg/keys-secret"
defaults:
  requires_approval: false
"#;

#[test]
fn deploy_keys_need_a_deploy_key_rule() {
    let p = Policy::parse("p.yaml", DEPLOY_KEY_POLICY).unwrap();
    let key = |repo: &str, perm: &str| {
        let r = repos(&[repo]);
        let q = perms(&[perm]);
        p.decide_for_bot(
            Some("b"),
            &Request::DeployKey {
                repositories: &r,
                permissions: &q,
            },
        )
    };
    let token = |repo: &str, perm: &str| {
        let r = repos(&[repo]);
        let q = perms(&[perm]);
        p.decide_for_bot(
            Some("b"),
            &Request::Github {
                repositories: &r,
                permissions: &q,
            },
        )
    };
    // A contents:write token rule allows the token, never a deploy key.
    assert_eq!(token("myorg/web", "contents:write").outcome, Outcome::Allow);
    let d = key("myorg/web", "contents:write");
    assert_eq!(d.outcome, Outcome::Deny, "{}", d.explanation);
    assert_eq!(d.rule, "defaults");
    // The deploy_key rule allows read keys, and never write keys it does not name.
    let d = key("myorg/keys-a", "contents:read");
    assert_eq!(d.outcome, Outcome::Allow, "{}", d.explanation);
    assert!(d.explanation.contains("deploy key"), "{}", d.explanation);
    assert_eq!(key("myorg/keys-a", "contents:write").outcome, Outcome::Deny);
    // ... nor does it allow tokens.
    assert_eq!(
        token("myorg/keys-a", "contents:read").outcome,
        Outcome::Allow
    );
    let other = Policy::parse(
        "p.yaml",
        "bots:\n  b:\n    identity: { type: api_key }\n    auto_approve:\n      - kind: deploy_key\n        repo: \"o/*\"\n        permissions: [contents:read]\n",
    )
    .unwrap();
    let r = repos(&["o/r"]);
    let q = perms(&["contents:read"]);
    let d = other.decide_for_bot(
        Some("b"),
        &Request::Github {
            repositories: &r,
            permissions: &q,
        },
    );
    assert_ne!(
        d.outcome,
        Outcome::Allow,
        "a deploy_key rule allows no token"
    );
    // A deny rule without a kind denies deploy keys too: deny wins.
    let d = key("myorg/keys-secret", "contents:read");
    assert_eq!(d.outcome, Outcome::Deny);
    assert!(d.rule.contains("deny"), "{}", d.rule);
    // A requires_approval rule of kind deploy_key asks a human for keys only.
    assert_eq!(
        key("myorg/ask-x", "contents:read").outcome,
        Outcome::RequireApproval
    );
    assert_eq!(
        token("myorg/ask-x", "contents:read").outcome,
        Outcome::Allow
    );
}

#[test]
fn rule_kinds_are_checked_at_load() {
    for (yaml, needle) in [
        (
            "bots:\n  b:\n    identity: { type: api_key }\n    auto_approve:\n      - kind: ssh\n        repo: \"o/*\"\n        permissions: [contents:read]\n",
            "unknown rule kind",
        ),
        (
            "bots:\n  b:\n    identity: { type: api_key }\n    auto_approve:\n      - kind: deploy_key\n        litellm_scope: ci\n",
            "litellm_scope rule has no kind",
        ),
    ] {
        let e = Policy::parse("p.yaml", yaml).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
        assert!(e.contains("p.yaml:"), "{e}");
    }
}

#[test]
fn deploy_key_resources_cover_only_their_repository_and_level() {
    let res = Resource::DeployKey {
        repository: "o/r".parse().unwrap(),
        permission: "contents:write".parse().unwrap(),
    };
    let r = repos(&["o/r"]);
    let q = perms(&["contents:read"]);
    assert!(res.covers(&Request::DeployKey {
        repositories: &r,
        permissions: &q
    }));
    assert!(!res.covers(&Request::Github {
        repositories: &r,
        permissions: &q
    }));
    let back = Resource::from_wire(&res.to_wire()).unwrap();
    assert_eq!(back, res);
}
