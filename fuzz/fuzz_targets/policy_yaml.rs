//! Policy YAML from an admin's file: parsing never panics, and a policy that loads can decide
//! any request for any of its bots without panicking.
#![no_main]

use botcreds_broker::policy::{Policy, Request};
use botcreds_proto::{Permission, RepoName};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::parse("fuzz.yaml", yaml) else {
        return;
    };
    let repos: Vec<RepoName> = ["acme/app", "acme/infra", "other/x"]
        .iter()
        .filter_map(|r| r.parse().ok())
        .collect();
    let perms: Vec<Permission> = ["contents:write", "issues:read"]
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    let names: Vec<String> = policy.bot_names().into_iter().map(str::to_owned).collect();
    for bot in names.iter().map(|n| Some(n.as_str())).chain([None, Some("nobody")]) {
        let _ = policy.decide_for_bot(
            bot,
            &Request::Github {
                repositories: &repos,
                permissions: &perms,
            },
        );
        let _ = policy.decide_for_bot(bot, &Request::Github { repositories: &[], permissions: &[] });
        let _ = policy.decide_for_bot(bot, &Request::Litellm { scope: "agent:review" });
    }
    let _ = policy.describe_bots();
});
