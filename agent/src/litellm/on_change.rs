//! Running an entry's `on_change` command: a cleared environment, its own process group that
//! is killed when it exits or times out, and only the tail of its stderr kept.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Clock;
use crate::credentials::rfc3339;
use crate::secret::Secret;
use crate::slot::{Slot, lock};

use super::key::Key;
use super::status::OnChangeStatus;

/// How much of an `on_change` command's stderr is kept for the log and status.
pub(super) const MAX_ON_CHANGE_OUTPUT: usize = 2048;

/// Runs the entry's `on_change` command (one run at a time per entry), bounded by its timeout.
/// Its environment says what happened; the key itself is never passed.
pub(super) async fn run_on_change(
    slot: Arc<Slot<Key>>,
    event: &'static str,
    steps: tokio::sync::watch::Sender<u64>,
    clock: Arc<dyn Clock>,
) {
    let entry = &slot.kind.entry;
    let Some(argv) = entry.on_change.clone() else {
        return;
    };
    let _one_at_a_time = slot.kind.on_change_lock.lock().await;
    let (name, expires, key) = {
        let st = slot.state();
        let h = st.held.as_ref();
        (
            h.map(|h| h.name.clone()).unwrap_or_default(),
            h.map(|h| rfc3339(h.expires_at)).unwrap_or_default(),
            h.map(|h| h.key.clone()),
        )
    };
    let vars = [
        ("BOTCREDS_LITELLM_EVENT", event.to_string()),
        ("BOTCREDS_LITELLM_SCOPE", entry.scope.clone()),
        ("BOTCREDS_LITELLM_KEY_NAME", name),
        ("BOTCREDS_LITELLM_EXPIRES_AT", expires),
        (
            "BOTCREDS_LITELLM_KEY_FILE",
            entry.key_file.display().to_string(),
        ),
    ];
    let started = clock.now();
    let (ok, result) = run_command(&argv, &vars, entry.on_change_timeout, key.as_ref()).await;
    if ok {
        tracing::info!(scope = %entry.scope, event, "on_change ran: {result}");
    } else {
        tracing::warn!(scope = %entry.scope, event, "on_change failed: {result}");
    }
    slot.state().extra.on_change = Some(OnChangeStatus {
        at: rfc3339(started),
        ok,
        result,
    });
    steps.send_modify(|n| *n = n.wrapping_add(1));
}

/// The only variables `on_change` gets from the agent's environment (the agent's may hold
/// `BOTCREDS_API_KEY`, `NOTIFY_SOCKET`, ...); its own `BOTCREDS_LITELLM_*` come on top.
pub const ON_CHANGE_ENV: &[&str] = &["PATH", "HOME", "LANG"];
/// `PATH` for `on_change` when the agent has none.
pub(super) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How much of `on_change`'s stderr is kept (its end); the rest is read and discarded.
pub const MAX_ON_CHANGE_CAPTURE: usize = 64 * 1024;
/// Once the command exited, its output is awaited this much longer at most: a process that
/// left its process group may hold the pipe open for ever.
pub(super) const PIPE_GRACE: Duration = Duration::from_millis(500);

/// Runs `argv` with `vars` in its environment, bounded by `timeout`: whether it succeeded, and
/// a one-line account (`exit status 0`, `exit status 1: <last line of stderr>`, `timed out
/// after 30s; killed`), with `key` redacted from it.
///
/// The command runs in its own process group with a cleared environment (plus
/// [`ON_CHANGE_ENV`]). Its exit ends the wait, whatever its children do; then, or on timeout,
/// the whole group is killed, so nothing it started in the background outlives it. Only the
/// last [`MAX_ON_CHANGE_CAPTURE`] bytes of its stderr are kept.
pub async fn run_command(
    argv: &[String],
    vars: &[(&str, String)],
    timeout: Duration,
    key: Option<&Secret>,
) -> (bool, String) {
    let Some(program) = argv.first() else {
        return (false, "no command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&argv[1..]).env_clear();
    for name in ON_CHANGE_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", DEFAULT_PATH);
    }
    cmd.envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => return (false, format!("cannot start {program}: {e}")),
    };
    // The group's id is the child's pid (`process_group(0)`); never 0 or 1 (kill(-1) would
    // signal every process).
    let mut group = ProcessGroup(
        child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .filter(|p| *p > 1),
    );
    let tail = Arc::new(Mutex::new(std::collections::VecDeque::new()));
    let mut reader = tokio::spawn(read_tail(child.stderr.take(), tail.clone()));
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    // Whatever the command left running goes now. (The group outlives the reaped child while
    // any member is left, so its id cannot have been reused by then.)
    group.kill();
    let status = match waited {
        Err(_) => {
            let _ = child.wait().await;
            None
        }
        Ok(Err(e)) => return (false, format!("waiting for it failed: {e}")),
        Ok(Ok(status)) => Some(status),
    };
    if tokio::time::timeout(PIPE_GRACE, &mut reader).await.is_err() {
        reader.abort();
    }
    let Some(status) = status else {
        return (
            false,
            format!("timed out after {}s; killed", timeout.as_secs()),
        );
    };
    let stderr = {
        let mut tail = lock(&tail);
        String::from_utf8_lossy(tail.make_contiguous()).into_owned()
    };
    let stderr = redact(&stderr, key);
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .chars()
        .take(MAX_ON_CHANGE_OUTPUT)
        .collect::<String>();
    let code = match status.code() {
        Some(code) => format!("exit status {code}"),
        None => "killed by a signal".to_string(),
    };
    let text = if last.is_empty() || status.success() {
        code
    } else {
        format!("{code}: {last}")
    };
    (status.success(), text)
}

/// Reads `stderr` to its end, keeping only its last [`MAX_ON_CHANGE_CAPTURE`] bytes in `tail`.
pub(super) async fn read_tail(
    stderr: Option<tokio::process::ChildStderr>,
    tail: Arc<Mutex<std::collections::VecDeque<u8>>>,
) {
    use tokio::io::AsyncReadExt;
    let Some(mut stderr) = stderr else { return };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut tail = lock(&tail);
                tail.extend(&buf[..n]);
                let excess = tail.len().saturating_sub(MAX_ON_CHANGE_CAPTURE);
                tail.drain(..excess);
            }
        }
    }
}

/// The process group of an `on_change` run; killed when dropped too (the agent stopping
/// mid-run), so no part of it is left behind.
pub(super) struct ProcessGroup(Option<i32>);

impl ProcessGroup {
    /// Kills the group, once.
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // `pgid` > 1 is the group this run created.
            if let Some(pgid) = rustix::process::Pid::from_raw(pgid) {
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(super) fn redact(text: &str, key: Option<&Secret>) -> String {
    match key {
        Some(k) if !k.expose().is_empty() => text.replace(k.expose(), "<redacted>"),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_key_from_command_output() {
        let k = Secret::new("sk-secret".into());
        assert_eq!(redact("got sk-secret ok", Some(&k)), "got <redacted> ok");
        assert_eq!(redact("plain", None), "plain");
    }
}
