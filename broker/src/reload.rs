//! The live policy: swapped whole on a successful reload (SIGHUP or a change of the file),
//! kept as it was when a reload fails. Reloads from async code run on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::policy::{Policy, PolicyError};
use crate::secret::sha256_hex;

/// What the policy file looked like when last read: a cheap stat first, the content hash
/// to confirm (editors may rewrite a file without changing it).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    sha256: String,
}

fn stat(path: &Path) -> Option<(Option<SystemTime>, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok(), meta.len()))
}

/// Holder of the current policy.
pub struct PolicyHandle {
    path: PathBuf,
    current: RwLock<Arc<Policy>>,
    seen: Mutex<Option<Fingerprint>>,
}

/// What a reload did.
#[derive(Debug)]
pub enum Reload {
    /// The file is unchanged; nothing was parsed.
    Unchanged,
    /// A new policy is live.
    Loaded { bots: usize },
}

impl PolicyHandle {
    /// Load the policy at startup; an error here stops the broker.
    pub fn load(path: &Path) -> Result<PolicyHandle, PolicyError> {
        let handle = PolicyHandle {
            path: path.to_path_buf(),
            current: RwLock::new(Arc::new(Policy::parse(&path.display().to_string(), "")?)),
            seen: Mutex::new(None),
        };
        handle.reload(true)?;
        Ok(handle)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn current(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the file's size or time differs from what was last loaded (or tried).
    pub fn looks_changed(&self) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match (&*seen, stat(&self.path)) {
            (Some(f), Some((modified, len))) => f.modified != modified || f.len != len,
            (None, _) => true,
            (Some(_), None) => false,
        }
    }

    /// Re-read the file. On error the current policy stays in force and the error says why.
    /// Without `force`, a file whose content hash is unchanged is not parsed again.
    pub fn reload(&self, force: bool) -> Result<Reload, PolicyError> {
        let name = self.path.display().to_string();
        let read_error = |e: std::io::Error| PolicyError {
            file: name.clone(),
            line: 0,
            column: 0,
            message: format!("cannot read the policy file: {e}"),
        };
        let (modified, len) = stat(&self.path).unwrap_or((None, 0));
        let text = std::fs::read(&self.path).map_err(read_error)?;
        let fingerprint = Fingerprint {
            modified,
            len,
            sha256: sha256_hex(&text),
        };
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let same = seen
                .as_ref()
                .is_some_and(|f| f.sha256 == fingerprint.sha256);
            *seen = Some(fingerprint);
            if same && !force {
                return Ok(Reload::Unchanged);
            }
        }
        let text = String::from_utf8(text).map_err(|_| PolicyError {
            file: name.clone(),
            line: 0,
            column: 0,
            message: "the policy file is not UTF-8".into(),
        })?;
        let policy = Policy::parse(&name, &text)?;
        let bots = policy.bot_names().len();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        Ok(Reload::Loaded { bots })
    }

    /// [`PolicyHandle::reload`] on tokio's blocking pool, for async code: reading and
    /// parsing a 10k-bot policy takes about half a second, which on a runtime worker would
    /// stall every request that worker serves.
    pub async fn reload_on_blocking_pool(
        self: Arc<Self>,
        force: bool,
    ) -> Result<Reload, PolicyError> {
        let file = self.path.display().to_string();
        tokio::task::spawn_blocking(move || self.reload(force))
            .await
            .unwrap_or_else(|e| {
                Err(PolicyError {
                    file,
                    line: 0,
                    column: 0,
                    message: format!("the policy reload did not finish: {e}"),
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "bots:\n  a:\n    identity: { type: api_key }\n    auto_approve:\n      - repo: \"o/r\"\n        permissions: [contents:read]\n";

    #[test]
    fn failed_reload_keeps_the_last_good_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let handle = PolicyHandle::load(&path).unwrap();
        assert!(handle.current().has_bot("a"));

        std::fs::write(
            &path,
            "bots:\n  a:\n    identity: { type: api_key }\n    auto_aprove: []\n",
        )
        .unwrap();
        assert!(handle.looks_changed());
        let err = handle.reload(false).unwrap_err();
        assert!(err.to_string().contains("auto_aprove"), "{err}");
        assert!(handle.current().has_bot("a"));
        assert!(!handle.looks_changed());

        std::fs::write(&path, GOOD.replace("  a:", "  b:")).unwrap();
        assert!(matches!(
            handle.reload(false).unwrap(),
            Reload::Loaded { bots: 1 }
        ));
        assert!(handle.current().has_bot("b"));
        assert!(matches!(handle.reload(false).unwrap(), Reload::Unchanged));
    }

    /// A policy of `bots` API-key bots, each with one auto-approve rule.
    fn policy_of(bots: usize, repo: &str) -> String {
        let mut text = String::from("bots:\n");
        for i in 0..bots {
            text.push_str(&format!(
                "  bot-{i}:\n    identity: {{ type: api_key }}\n    auto_approve:\n      - repo: \"{repo}\"\n        permissions: [contents:read]\n"
            ));
        }
        text
    }

    /// reload_blocks_the_runtime: a 10k-bot policy takes ~0.5 s to parse; parsed on a runtime
    /// worker it stalls every request that worker serves. On a one-thread runtime a task
    /// spawned next to the reload must get to run while the reload is still in flight.
    #[test]
    fn a_reload_leaves_the_runtime_free() {
        const BOTS: usize = 2_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, policy_of(BOTS, "o/r")).unwrap();
        let handle = Arc::new(PolicyHandle::load(&path).unwrap());
        std::fs::write(&path, policy_of(BOTS, "o/other")).unwrap();

        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (ran, ran_rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let _ = ran.send(());
            });
            let reload = handle.clone().reload_on_blocking_pool(false);
            tokio::pin!(reload);
            tokio::select! {
                biased;
                done = &mut reload => panic!(
                    "the reload ({done:?}) finished before a concurrent task could run: \
                     it parsed on the runtime's thread"
                ),
                _ = ran_rx => {}
            }
            assert!(matches!(
                reload.await.unwrap(),
                Reload::Loaded { bots: BOTS }
            ));
        });
        assert!(!handle.current().bot_names().is_empty());
    }

    #[test]
    fn missing_file_is_an_error_at_startup() {
        let err = PolicyHandle::load(Path::new("/nonexistent/policy.yaml"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("cannot read"), "{err}");
    }
}
