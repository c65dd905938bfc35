//! The agent and `git-credential-botcreds` driven by the real `git` against the test git server
//! (`tests/src/git_server.rs`) and a stand-in broker that issues tokens the git server accepts
//! (`support/mod.rs`). End-to-end tests with the real broker live in the `tests` crate.

mod support;

use std::time::SystemTime;

use botcreds_proto::agent::CredentialState;
use std::process::Stdio;
use support::{AGENT, HELPER, Issued, World};
use tokio::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_server_accepts_only_valid_tokens() {
    let world = World::new().await;
    world
        .issued
        .lock()
        .unwrap()
        .tokens
        .insert("ghs_valid".into(), (vec!["acme/web".into()], false));
    let host = world.git.host();
    let good = format!("http://x-access-token:ghs_valid@{host}/acme/web.git");
    let (ok, err) = world
        .git(world.dir.path(), &["clone", "--quiet", &good, "good"])
        .await;
    assert!(ok, "{err}");
    assert!(world.dir.path().join("good/README.md").exists());

    let bad = format!("http://x-access-token:ghs_wrong@{host}/acme/web.git");
    let (ok, err) = world
        .git(world.dir.path(), &["clone", "--quiet", &bad, "bad"])
        .await;
    assert!(!ok);
    assert!(
        err.contains("Authentication failed") || err.contains("401"),
        "{err}"
    );

    let other = format!("http://x-access-token:ghs_valid@{host}/acme/api.git");
    let (ok, _) = world
        .git(world.dir.path(), &["clone", "--quiet", &other, "other"])
        .await;
    assert!(!ok, "the token does not cover acme/api");

    let clone = world.dir.path().join("good");
    std::fs::write(clone.join("x"), "x").unwrap();
    assert!(world.git(&clone, &["add", "x"]).await.0);
    assert!(world.git(&clone, &["commit", "-qm", "x"]).await.0);
    let (ok, err) = world
        .git(&clone, &["push", "--quiet", "origin", "main"])
        .await;
    assert!(!ok, "read-only token pushed");
    assert!(err.contains("403"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_push_per_repository_tokens_and_denials() {
    let mut world = World::new().await;
    world
        .issued
        .lock()
        .unwrap()
        .denied_repos
        .insert("acme/secret".into());
    world.start_agent().await;

    let (ok, err) = world.clone("acme/web", "web").await;
    assert!(ok, "{err}\n{}", world.agent_log());
    let (ok, err) = world.clone("acme/api", "api").await;
    assert!(ok, "{err}");

    // Push with a write token.
    let web = world.dir.path().join("web");
    std::fs::write(web.join("change.txt"), "hello").unwrap();
    assert!(world.git(&web, &["add", "change.txt"]).await.0);
    assert!(world.git(&web, &["commit", "-qm", "change"]).await.0);
    let (ok, err) = world
        .git(&web, &["push", "--quiet", "origin", "main"])
        .await;
    assert!(ok, "{err}");
    let (_, local_head) = {
        let out = Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(&web)
            .output()
            .await
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    assert_eq!(world.git.head("acme/web", "main").unwrap(), local_head);

    // Push with a read-only token is refused by the server.
    let (ok, err) = world.clone("other/readonly", "ro").await;
    assert!(ok, "{err}");
    let ro = world.dir.path().join("ro");
    std::fs::write(ro.join("change.txt"), "hello").unwrap();
    assert!(world.git(&ro, &["add", "change.txt"]).await.0);
    assert!(world.git(&ro, &["commit", "-qm", "change"]).await.0);
    let (ok, err) = world.git(&ro, &["push", "--quiet", "origin", "main"]).await;
    assert!(!ok, "pushed with a read-only token");
    assert!(err.contains("403"), "{err}");

    // A denied repository: the broker's reason reaches git's stderr, and git does not prompt.
    let (ok, err) = world.clone("acme/secret", "secret").await;
    assert!(!ok);
    assert!(
        err.contains("policy denies acme/secret to test-bot"),
        "{err}"
    );
    assert!(err.contains("told us to quit"), "{err}");

    // One token per repository (useHttpPath), each asked for once: later requests hit the cache.
    let requests = world.issued.lock().unwrap().requests.clone();
    for repo in ["acme/web", "acme/api", "other/readonly"] {
        assert_eq!(
            requests
                .iter()
                .filter(|(r, _)| r.as_slice() == [repo.to_string()])
                .count(),
            1,
            "{repo}: {requests:?}"
        );
    }
    assert!(
        requests
            .iter()
            .all(|(_, ttl)| ttl.as_deref() == Some("45m")),
        "min_ttl defaults to refresh_before + 5m: {requests:?}"
    );

    // A host the agent does not serve: nothing printed, exit 0.
    let (out, err) = world
        .helper("get", "protocol=https\nhost=example.com\n", &[])
        .await;
    assert_eq!((out.as_str(), err.as_str()), ("", ""));
    // A repository the agent does not serve: nothing printed, a hint on stderr.
    let input = format!(
        "protocol=http\nhost={}\npath=stranger/repo.git\n",
        world.git.host()
    );
    let (out, err) = world.helper("get", &input, &[]).await;
    assert_eq!(out, "");
    assert!(err.contains("stranger/repo"), "{err}");
    // Bad input: a clear message, nothing printed.
    let (out, err) = world.helper("get", "protocol=https\n", &[]).await;
    assert_eq!(out, "");
    assert!(err.contains("has no host"), "{err}");
    let (out, err) = world.helper("get", "protocol=https\ngarbage\n", &[]).await;
    assert_eq!(out, "");
    assert!(err.contains("line 2 has no '='"), "{err}");
    // The answer itself.
    let input = format!(
        "protocol=http\nhost={}\npath=acme/web.git\n",
        world.git.host()
    );
    let (out, _) = world.helper("get", &input, &[]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "username=x-access-token");
    assert!(lines[1].starts_with("password=ghs_test"), "{out}");
    let expiry: u64 = lines[2]
        .strip_prefix("password_expiry_utc=")
        .unwrap()
        .parse()
        .unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(expiry > now + 3000, "about an hour left");
    // `store` and unknown operations do nothing.
    let (out, err) = world
        .helper("store", &format!("{input}username=x\npassword=y\n"), &[])
        .await;
    assert_eq!((out.as_str(), err.as_str()), ("", ""));
    let (out, _) = world.helper("capability", "", &[]).await;
    assert_eq!(out, "");

    let log = world.agent_log();
    assert!(!log.contains("ghs_test"), "a token reached the log:\n{log}");
    world.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_from_cache_while_the_broker_is_down_also_after_a_restart() {
    let mut world = World::new().await;
    world.start_agent().await;
    let (ok, err) = world.clone("acme/web", "web1").await;
    assert!(ok, "{err}");
    let status = world.status().await;
    assert!(status.broker_reachable);
    assert!(!status.serving_from_cache);

    world.broker.take().unwrap().kill().await;
    let (ok, err) = world.clone("acme/web", "web2").await;
    assert!(ok, "clone from the cache with the broker down: {err}");
    let web2 = world.dir.path().join("web2");
    let (ok, err) = world.git(&web2, &["fetch", "--quiet"]).await;
    assert!(ok, "{err}");
    // Nothing cached for this one: a clear failure.
    let (ok, err) = world.clone("acme/api", "api").await;
    assert!(!ok);
    assert!(err.contains("broker unreachable"), "{err}");

    let status = world.status().await;
    assert!(!status.broker_reachable);
    let web = status
        .credentials
        .iter()
        .find(|c| c.repositories == ["acme/web"])
        .expect("acme/web tracked");
    assert_eq!(web.state, CredentialState::Fresh, "not due for refresh yet");
    assert!(web.credential_id.is_some());
    let api = status
        .credentials
        .iter()
        .find(|c| c.repositories == ["acme/api"])
        .expect("acme/api tracked");
    assert_eq!(api.state, CredentialState::Missing);
    assert!(
        api.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("unreachable")
    );

    // The table form works too.
    let table = Command::new(AGENT)
        .args(["status", "--socket"])
        .arg(world.socket())
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("UNREACHABLE") && table.contains("acme/web"),
        "{table}"
    );

    // Restart the agent: the disk cache carries the token across.
    world.stop_agent().await;
    world.start_agent().await;
    assert!(
        world.agent_log().contains("loaded cached credential"),
        "{}",
        world.agent_log()
    );
    let (ok, err) = world.clone("acme/web", "web3").await;
    assert!(
        ok,
        "clone after restart with the broker down: {err}\n{}",
        world.agent_log()
    );
    world.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_fails_once_then_is_replaced() {
    let mut world = World::new().await;
    world.start_agent().await;
    let (ok, err) = world.clone("acme/web", "web").await;
    assert!(ok, "{err}");
    let web_tokens = |issued: &Issued| -> Vec<String> {
        let mut t: Vec<String> = issued
            .tokens
            .iter()
            .filter(|(_, (repos, _))| repos.as_slice() == ["acme/web".to_string()])
            .map(|(token, _)| token.clone())
            .collect();
        t.sort();
        t
    };
    let first = {
        let mut issued = world.issued.lock().unwrap();
        let tokens = web_tokens(&issued);
        assert_eq!(tokens.len(), 1);
        issued.revoked.insert(tokens[0].clone());
        tokens[0].clone()
    };
    let web = world.dir.path().join("web");
    let (ok, err) = world.git(&web, &["fetch", "--quiet"]).await;
    assert!(!ok, "the revoked token still worked");
    assert!(err.contains("Authentication failed"), "{err}");
    // git sent `erase`; the next attempt fetches a new token and succeeds.
    let (ok, err) = world.git(&web, &["fetch", "--quiet"]).await;
    assert!(ok, "{err}\n{}", world.agent_log());
    let tokens = web_tokens(&world.issued.lock().unwrap());
    assert_eq!(tokens.len(), 2, "one replacement token");
    assert!(tokens.iter().any(|t| t != &first));
    assert!(
        world.agent_log().contains("rejected"),
        "{}",
        world.agent_log()
    );
    world.stop_agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helper_never_hangs_git() {
    let world = World::new().await;
    // No agent: silent, exit 0.
    let (out, err) = world
        .helper("get", "protocol=https\nhost=github.com\n", &[])
        .await;
    assert_eq!((out.as_str(), err.as_str()), ("", ""));

    // An agent that accepts but never answers: a bounded wait and a clear message.
    std::fs::create_dir_all(world.dir.path().join("run")).unwrap();
    let _silent = std::os::unix::net::UnixListener::bind(world.socket()).unwrap();
    let (out, err) = world
        .helper(
            "get",
            "protocol=https\nhost=github.com\n",
            &[("BOTCREDS_HELPER_TIMEOUT", "0.3")],
        )
        .await;
    assert_eq!(out, "");
    assert!(err.contains("did not answer within 0.3s"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_is_a_startup_error_naming_the_key() {
    let world = World::new().await;
    let path = world.dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "broker = \"http://127.0.0.1:1\"\n[[github]]\nrepositories = [\"myorg\"]\npermissions = [\"contents:read\"]\n",
    )
    .unwrap();
    let out = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("repositories") && err.contains("not of the form owner/name"),
        "{err}"
    );
}

/// SO_PEERCRED in action: a user outside the allow-list reaches the socket (here its mode is
/// opened up, as group membership would) and is refused by the agent. Needs root to run the
/// helper as another user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_outside_the_allow_list_is_refused() {
    support::require_root("to run the helper as another uid");
    let mut world = World::new().await;
    world.start_agent().await;
    use std::os::unix::fs::PermissionsExt;
    for p in [world.dir.path().to_path_buf(), world.dir.path().join("run")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(world.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let input = format!(
        "protocol=http\nhost={}\npath=acme/web.git\n",
        world.git.host()
    );
    let mut child = Command::new(HELPER)
        .arg("get")
        .env("BOTCREDS_AGENT_SOCKET", world.socket())
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .await
            .unwrap();
    }
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uid 65534") && err.contains("may not use this agent"),
        "{err}"
    );
    assert!(
        world
            .issued
            .lock()
            .unwrap()
            .requests
            .iter()
            .all(|(r, _)| r != &["acme/web".to_string()])
    );
    world.stop_agent().await;
}

/// The agent refreshes a configured credential on its own, from a timer, once less than
/// `refresh_before` of it remains; git is served the new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_ahead_of_expiry_without_git_asking() {
    let mut world = World::with_readonly_extra("refresh_before = \"59m\"\nmin_ttl = \"1h\"").await;
    // Tokens with 59m5s left: due for refresh (59m + jitter) within seconds of being issued.
    world.issued.lock().unwrap().lifetime = Some(time::Duration::seconds(59 * 60 + 5));
    let requested = world.issued.lock().unwrap().requested.clone();
    let readonly_requests = |world: &World| {
        world
            .issued
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(r, _)| r.as_slice() == ["other/readonly".to_string()])
            .count()
    };
    world.start_agent().await;
    // Bounded only so that a broken agent fails the test instead of hanging it.
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        loop {
            let wait = requested.notified();
            if readonly_requests(&world) >= 2 {
                break;
            }
            wait.await;
        }
    })
    .await
    .expect("no background refresh within a minute");
    let requests = world.issued.lock().unwrap().requests.clone();
    assert!(
        requests.iter().all(|(_, ttl)| ttl.as_deref() == Some("1h")),
        "{requests:?}"
    );

    // git gets the newest token the broker issued for it.
    let (ok, err) = world.clone("other/readonly", "ro").await;
    assert!(ok, "{err}");
    let status = world.status().await;
    let ro = status
        .credentials
        .iter()
        .find(|c| c.repositories == ["other/readonly"])
        .unwrap();
    assert!(ro.last_refresh.is_some());
    assert!(ro.next_refresh.is_some(), "a refresh is always scheduled");
    world.stop_agent().await;
}
