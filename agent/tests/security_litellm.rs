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
