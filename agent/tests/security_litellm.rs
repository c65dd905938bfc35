//! Negative-security tests of what the agent writes for LiteLLM keys: whatever a compromised or
//! buggy broker puts into an answer, the files the agent writes must not run code, follow a
//! user's symlink to a root-only file, or leak it.

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
