//! End-to-end: the real `botcreds-agent` stopped by SIGTERM before it is ready. The agent reads
//! its configuration from a named pipe, so the test knows the agent is in the middle of
//! starting (it has opened the pipe) and can signal it exactly there; a SIGTERM at that point
//! must end in the same clean stop as one after `agent ready`.

use std::process::Stdio;
use std::time::Duration;

use botcreds_tests::agent::AgentBuilder;
use botcreds_tests::broker::binary;
use tokio::io::AsyncReadExt;

/// Bounds that only turn a hang into a failure; nothing is measured.
const WAIT: Duration = Duration::from_secs(60);

/// Regression: the SIGTERM handler used to be installed only after "agent ready", so a SIGTERM
/// during start-up killed the agent by the signal's default action (no socket clean-up, no
/// release of LiteLLM keys).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_start_up_is_a_clean_stop() {
    // Nothing here needs a broker: the agent does not call it before it is ready, and stops
    // without calling it when it has no LiteLLM keys to release.
    let home = AgentBuilder::new("http://127.0.0.1:9").build();
    let text = std::fs::read_to_string(home.config_path()).expect("agent.toml");
    let fifo = home.dir().join("agent-fifo.toml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success(), "mkfifo failed");

    let mut child = tokio::process::Command::new(binary("botcreds-agent"))
        .arg("run")
        .arg("--config")
        .arg(&fifo)
        .env("RUST_LOG", "info")
        .env_remove("BOTCREDS_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning botcreds-agent");
    let pid = child.id().expect("agent running");

    // Opening the pipe for writing returns once the agent has opened it for reading: the
    // agent is now loading its configuration, well before it is ready.
    let writer = {
        let fifo = fifo.clone();
        tokio::time::timeout(
            WAIT,
            tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().write(true).open(fifo)),
        )
        .await
        .expect("the agent opens its configuration")
        .expect("join")
        .expect("open the pipe for writing")
    };
    let killed = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(killed.success(), "kill -TERM {pid}");
    // The rest of the configuration; a killed agent makes this a broken pipe, which is fine:
    // the exit status below says what happened.
    let _ = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut writer = writer;
        writer.write_all(text.as_bytes())
    })
    .await;

    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("the agent exits after SIGTERM")
        .expect("wait");
    let mut logs = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ =
            tokio::time::timeout(Duration::from_secs(10), stderr.read_to_string(&mut logs)).await;
    }
    assert_eq!(
        status.code(),
        Some(0),
        "a SIGTERM during start-up must be a clean stop, not death by signal ({status}); log:\n{logs}"
    );
    assert!(logs.contains("agent stopped"), "{logs}");
    assert!(
        !home.socket().exists(),
        "the clean stop removes the socket file; log:\n{logs}"
    );
}
