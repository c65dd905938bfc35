//! Keeping an entry's files in line with its key: written (or cleared) through
//! [`crate::outputs`], their state recorded for status, `on_change` started when one changed.

use std::sync::Arc;

use crate::litellm_config::LitellmEntry;
use crate::outputs::{self, FileSpec, KeyMaterial, Outcome, OutputKind};
use crate::slot::{Held, Slot, lock};

use super::key::Key;
use super::on_change::run_on_change;
use super::task::Inner;

impl Inner {
    /// Brings every file of `slot` in line with the key held (or its absence), and runs
    /// `on_change` (in the background) when any file changed.
    pub(super) async fn sync_files(&self, slot: &Arc<Slot<Key>>) {
        let held = slot.servable(self.now());
        let has_key = held.is_some();
        let entry = slot.kind.entry.clone();
        let files = slot.kind.files.clone();
        let results = tokio::task::spawn_blocking(move || {
            let _one_writer = lock(&files);
            write_files(&entry, held.as_ref())
        })
        .await;
        let scope = &slot.kind.entry.scope;
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(scope = %scope, error = %e, "writing the key files failed");
                return;
            }
        };
        let now = self.now();
        let mut changed = false;
        {
            let mut st = slot.state();
            for (i, result) in results.into_iter().enumerate() {
                let Some(out) = st.extra.outputs.get_mut(i) else {
                    continue;
                };
                match result {
                    Ok(outcome) => {
                        out.state = if has_key { "written" } else { "removed" };
                        out.error = None;
                        if outcome != Outcome::Unchanged {
                            out.changed_at = Some(now);
                            changed = true;
                        }
                    }
                    Err(message) => {
                        if out.error.as_deref() != Some(message.as_str()) {
                            tracing::warn!(scope = %scope, error = %message, "cannot update a LiteLLM key file");
                        }
                        out.state = "error";
                        out.error = Some(message);
                    }
                }
            }
        }
        if changed {
            let event = if has_key { "updated" } else { "removed" };
            tracing::info!(scope = %scope, event, "LiteLLM key files changed");
            if slot.kind.entry.on_change.is_some() {
                tokio::spawn(run_on_change(
                    slot.clone(),
                    event,
                    self.steps.clone(),
                    self.edges().clock.clone(),
                ));
            }
        }
    }
}

/// Writes (or clears) every file of `entry`; one result per output, errors as text.
pub(super) fn write_files(
    entry: &LitellmEntry,
    held: Option<&Held<Key>>,
) -> Vec<Result<Outcome, String>> {
    let spec = FileSpec {
        mode: entry.mode,
        group: entry.group,
    };
    let material = held.map(|h| KeyMaterial {
        key: h.key.expose(),
        base_url: &h.base_url,
        models: &h.models,
        model: entry.model.as_deref(),
    });
    entry
        .outputs()
        .into_iter()
        .map(|(key, path)| {
            let kind = OutputKind::from_key(key).ok_or_else(|| format!("unknown output {key}"))?;
            outputs::sync(kind, path, spec, material.as_ref()).map_err(|e| e.to_string())
        })
        .collect()
}
