//! Negative-security tests of what the agent writes for LiteLLM keys: whatever a compromised or
//! buggy broker puts into an answer, the files the agent writes must not run code, follow a
//! user's symlink to a root-only file, or leak it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::Path;
use std::process::Command;

use botcreds_agent::outputs::{self, FileSpec, KeyMaterial, OutputKind};

const PRIVATE: FileSpec = FileSpec {
    mode: 0o600,
    group: None,
};

/// Sources `env` the way the docs tell users to (`set -a; . FILE`) in `/bin/sh`, inside `dir`,
/// and prints `var`.
fn source_and_print(dir: &Path, env: &Path, var: &str) -> String {
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("set -a; . \"$1\"; printf %s \"${var}\""))
        .arg("sh")
        .arg(env)
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sourcing failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Hostile values for the key and base URL: each would run a command (creating `PWNED` in the
/// working directory) if the env file held it unquoted or badly quoted.
const HOSTILE: &[&str] = &[
    "http://litellm:4000/v1;touch PWNED",
    "http://litellm:4000/v1;id>PWNED",
    "http://x/v1&touch PWNED",
    "http://x/v1|touch PWNED",
    "http://x/v1$(touch PWNED)",
    "http://x/v1`touch PWNED`",
    "http://x/v1'; touch PWNED; '",
    "http://x/v1'\\''; touch PWNED; '",
    "http://x/v1\"; touch PWNED; \"",
    "http://x/v1 touch PWNED",
    "http://x/(v1)<in>PWNED",
    "~/v1 ${HOME:=x}",
    "sk-a;touch PWNED",
    "\\'$(touch PWNED)",
];

#[test]
fn env_file_values_never_execute_when_sourced() {
    let tmp = tempfile::tempdir().unwrap();
    let env = tmp.path().join("env");
    let models: Vec<String> = vec![];
    for hostile in HOSTILE {
        for (as_key, var, other_var) in [
            (false, "LITELLM_BASE_URL", "OPENAI_BASE_URL"),
            (true, "LITELLM_API_KEY", "OPENAI_API_KEY"),
        ] {
            let material = KeyMaterial {
                key: if as_key { hostile } else { "sk-plain" },
                base_url: if as_key { "http://x/v1" } else { hostile },
                models: &models,
                model: None,
            };
            outputs::sync(OutputKind::EnvFile, &env, PRIVATE, Some(&material)).unwrap();
            assert_eq!(&source_and_print(tmp.path(), &env, var), hostile, "{var}");
            assert_eq!(
                &source_and_print(tmp.path(), &env, other_var),
                hostile,
                "{other_var}"
            );
            assert!(
                !tmp.path().join("PWNED").exists(),
                "sourcing ran a command for {hostile:?}"
            );
        }
    }
}

#[test]
fn env_file_refuses_control_characters() {
    let tmp = tempfile::tempdir().unwrap();
    let env = tmp.path().join("env");
    let models: Vec<String> = vec![];
    for hostile in ["http://x/v1\ntouch PWNED", "http://x/\rv1", "http://x/\0v1"] {
        let material = KeyMaterial {
            key: "sk-plain",
            base_url: hostile,
            models: &models,
            model: None,
        };
        let err = outputs::sync(OutputKind::EnvFile, &env, PRIVATE, Some(&material));
        assert!(err.is_err(), "{hostile:?} was written");
        assert!(!env.exists(), "{hostile:?}: nothing written");
    }
}

// ---------------------------------------------------------------------------------------------
// on_change: the agent (often root) runs a command after every key change.

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

fn vars() -> Vec<(&'static str, String)> {
    vec![
        ("BOTCREDS_LITELLM_EVENT", "updated".into()),
        ("BOTCREDS_LITELLM_SCOPE", "ci".into()),
    ]
}

/// Whether process `pid` is gone (or a zombie nobody reaped: it runs nothing any more).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// A process is killed asynchronously: wait (bounded) until it is gone.
async fn wait_gone(pid: i32) -> bool {
    for _ in 0..200 {
        if gone(pid) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

fn read_pid(path: &Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// on_change inherited the agent's whole environment (BOTCREDS_API_KEY, NOTIFY_SOCKET, ...):
/// it gets only a short allow-list and its own variables.
#[tokio::test]
async fn on_change_environment_is_an_allow_list() {
    let tmp = tempfile::tempdir().unwrap();
    let dump = tmp.path().join("env");
    let script = format!("env > {}", dump.display());
    let (ok, result) = botcreds_agent::litellm::run_command(
        &sh(&script),
        &vars(),
        std::time::Duration::from_secs(60),
        None,
    )
    .await;
    assert!(ok, "{result}");
    let env = std::fs::read_to_string(&dump).unwrap();
    // What the shell itself adds.
    let shell = ["PWD", "SHLVL", "_", "OLDPWD"];
    let allowed = ["PATH", "HOME", "LANG"];
    for line in env.lines() {
        let name = line.split('=').next().unwrap();
        assert!(
            allowed.contains(&name)
                || shell.contains(&name)
                || name.starts_with("BOTCREDS_LITELLM_"),
            "on_change inherited {name}"
        );
    }
    assert!(env.contains("BOTCREDS_LITELLM_EVENT=updated\n"), "{env}");
    assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
}

/// A command that leaves a child in the background was reported as timed out (its child held
/// the stderr pipe open) and the child lived on. The command's own exit counts, and its whole
/// process group goes with it.
#[tokio::test]
async fn on_change_background_children_do_not_outlive_it() {
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("pid");
    let script = format!("sleep 1000 & echo $! > {}; exit 0", pidfile.display());
    let (ok, result) = botcreds_agent::litellm::run_command(
        &sh(&script),
        &vars(),
        std::time::Duration::from_secs(20),
        None,
    )
    .await;
    assert!(ok, "the command itself exited 0: {result}");
    assert_eq!(result, "exit status 0");
    let pid = read_pid(&pidfile);
    assert!(wait_gone(pid).await, "the background child {pid} survived");
}

/// On timeout, the whole process group is killed, not only the direct child.
#[tokio::test]
async fn on_change_timeout_kills_the_process_group() {
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("pid");
    let script = format!("sleep 1000 & echo $! > {}; sleep 1000", pidfile.display());
    let (ok, result) = botcreds_agent::litellm::run_command(
        &sh(&script),
        &vars(),
        std::time::Duration::from_secs(2),
        None,
    )
    .await;
    assert!(!ok);
    assert!(result.contains("timed out"), "{result}");
    let pid = read_pid(&pidfile);
    assert!(
        wait_gone(pid).await,
        "the grandchild {pid} survived the timeout"
    );
}

/// The peak resident memory of this process (`VmHWM`), in KiB, after resetting it.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

fn peak_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 1.5 GB on stderr grew the agent to 2 GB: the output is read into a bounded buffer, the rest
/// discarded, and the last line still reported.
#[tokio::test]
async fn on_change_output_is_bounded() {
    reset_peak();
    let before = peak_kib();
    let script =
        "head -c 300000000 /dev/zero | tr '\\0' x >&2; echo >&2; echo 'the last line' >&2; exit 3";
    let (ok, result) = botcreds_agent::litellm::run_command(
        &sh(script),
        &vars(),
        std::time::Duration::from_secs(300),
        None,
    )
    .await;
    let grown = peak_kib().saturating_sub(before);
    assert!(!ok);
    assert_eq!(result, "exit status 3: the last line");
    assert!(
        grown < 64 * 1024,
        "reading 300 MB of stderr grew the peak memory by {grown} KiB"
    );
}

// ---------------------------------------------------------------------------------------------
// Symlinks: the agent (root) writes into directories the target user controls.

/// A user that is not root (`nobody`).
const USER: u32 = 65534;

fn chown_user(path: &Path) {
    std::os::unix::fs::lchown(path, Some(USER), Some(USER)).unwrap();
}

fn all_outputs() -> [(OutputKind, &'static str); 4] {
    [
        (OutputKind::KeyFile, "key"),
        (OutputKind::EnvFile, "env"),
        (OutputKind::RooCode, "settings.json"),
        (OutputKind::OpenCode, "config.json"),
    ]
}

const ROOT_SECRET: &str = "{\"secret\": \"root-only-content\"}";

/// A root-only directory holding a root-only file named like each output.
fn root_only_dir(base: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = base.join("root-only");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    for (_, name) in all_outputs() {
        std::fs::write(dir.join(name), ROOT_SECRET).unwrap();
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    dir
}

/// Every file under `dir` (not following links), with its content.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(files_under(&e.path()));
        } else if t.is_file() {
            out.push((
                e.path(),
                std::fs::read_to_string(e.path()).unwrap_or_default(),
            ));
        }
    }
    out.sort();
    out
}

fn assert_root_dir_untouched(root: &Path, what: &str) {
    let files = files_under(root);
    assert_eq!(
        files.len(),
        all_outputs().len(),
        "{what}: files appeared or went: {files:?}"
    );
    for (path, content) in files {
        assert_eq!(
            content,
            ROOT_SECRET,
            "{what}: {} was changed",
            path.display()
        );
    }
}

fn assert_not_leaked(user_dir: &Path, what: &str) {
    for (path, content) in files_under(user_dir) {
        assert!(
            !content.contains("root-only-content"),
            "{what}: the root-only file leaked into {}",
            path.display()
        );
    }
}

/// A user symlinks an output (`settings.json`, `key`, ...) in their own directory to a root-only
/// file: the agent must neither read it into a file the user can read nor rewrite it.
#[test]
fn file_symlink_to_a_root_only_file_is_neither_leaked_nor_rewritten() {
    let models = vec!["m".to_string()];
    for (kind, name) in all_outputs() {
        for with_key in [true, false] {
            let what = format!("{name}, key {with_key}");
            let tmp = tempfile::tempdir().unwrap();
            let root = root_only_dir(tmp.path());
            let user_dir = tmp.path().join("home/.config/tool");
            std::fs::create_dir_all(&user_dir).unwrap();
            chown_user(&tmp.path().join("home"));
            chown_user(&tmp.path().join("home/.config"));
            chown_user(&user_dir);
            let path = user_dir.join(name);
            std::os::unix::fs::symlink(root.join(name), &path).unwrap();
            chown_user(&path);
            let material = KeyMaterial {
                key: "sk-new",
                base_url: "http://x/v1",
                models: &models,
                model: None,
            };
            let _ = outputs::sync(kind, &path, PRIVATE, with_key.then_some(&material));
            assert_root_dir_untouched(&root, &what);
            assert_not_leaked(&tmp.path().join("home"), &what);
        }
    }
}

/// A user replaces a directory on the way to an output with a symlink to a root-only
/// directory: the agent must not write, remove or read anything there.
#[test]
fn directory_symlink_to_a_root_only_directory_is_not_followed() {
    let models = vec!["m".to_string()];
    for (kind, name) in all_outputs() {
        for with_key in [true, false] {
            let what = format!("{name}, key {with_key}");
            let tmp = tempfile::tempdir().unwrap();
            let root = root_only_dir(tmp.path());
            let home = tmp.path().join("home");
            std::fs::create_dir_all(home.join(".config")).unwrap();
            chown_user(&home);
            chown_user(&home.join(".config"));
            let link = home.join(".config/tool");
            std::os::unix::fs::symlink(&root, &link).unwrap();
            chown_user(&link);
            let material = KeyMaterial {
                key: "sk-new",
                base_url: "http://x/v1",
                models: &models,
                model: None,
            };
            let result = outputs::sync(
                kind,
                &link.join(name),
                PRIVATE,
                with_key.then_some(&material),
            );
            assert!(result.is_err(), "{what}: went through the link: {result:?}");
            assert_root_dir_untouched(&root, &what);
            assert_not_leaked(&home, &what);
        }
    }
}

/// Symlinks only root can have made (root's, in a directory only root may change) are
/// followed: `/var/run -> /run` and the like keep working.
#[test]
fn root_owned_symlinks_in_root_only_directories_are_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, tmp.path().join("alias")).unwrap();
    let models = vec!["m".to_string()];
    let material = KeyMaterial {
        key: "sk-new",
        base_url: "http://x/v1",
        models: &models,
        model: None,
    };
    let path = tmp.path().join("alias/sub/key");
    outputs::sync(OutputKind::KeyFile, &path, PRIVATE, Some(&material)).unwrap();
    assert_eq!(
        std::fs::read_to_string(real.join("sub/key")).unwrap(),
        "sk-new\n"
    );
}

/// A hard link to a root-only file in the user's directory (where the kernel allows making
/// one) is not read into the config the agent writes.
#[test]
fn hard_link_to_a_root_only_file_is_not_leaked() {
    let models = vec!["m".to_string()];
    for (kind, name) in [
        (OutputKind::RooCode, "settings.json"),
        (OutputKind::OpenCode, "config.json"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let root = root_only_dir(tmp.path());
        let user_dir = tmp.path().join("home");
        std::fs::create_dir_all(&user_dir).unwrap();
        chown_user(&user_dir);
        let path = user_dir.join(name);
        std::fs::hard_link(root.join(name), &path).unwrap();
        let material = KeyMaterial {
            key: "sk-new",
            base_url: "http://x/v1",
            models: &models,
            model: None,
        };
        let result = outputs::sync(kind, &path, PRIVATE, Some(&material));
        assert!(result.is_err(), "{name}: {result:?}");
        assert_root_dir_untouched(&root, name);
        // The link itself is the root file (mode 0600, root's): unchanged, and no other file
        // (that the user could read) appeared.
        assert_eq!(
            files_under(&user_dir),
            vec![(path.clone(), ROOT_SECRET.to_string())],
            "{name}"
        );
    }
}

/// A child that left the command's process group (`setsid`) cannot be killed with it and may
/// hold the stderr pipe open for ever: the run still ends when the command itself exits.
#[tokio::test]
async fn on_change_ends_with_the_command_even_if_an_escaped_child_holds_its_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    let pidfile = tmp.path().join("pid");
    let script = format!(
        "setsid sleep 1000 & echo $! > {}; echo done >&2; exit 0",
        pidfile.display()
    );
    let (ok, result) = botcreds_agent::litellm::run_command(
        &sh(&script),
        &vars(),
        std::time::Duration::from_secs(30),
        None,
    )
    .await;
    let pid = read_pid(&pidfile);
    // The escaped child is this test's to end.
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
    assert!(ok, "{result}");
    assert_eq!(result, "exit status 0");
}
