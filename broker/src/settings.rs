//! What every `broker.toml` section's parser shares, and nothing else: the typed validation
//! error, mode-checked secret files, the (injectable) environment and relative paths.
//!
//! A leaf module: it imports nothing of the crate but `secret`, so that each section can be
//! parsed by the module that owns it (`keys/config.rs`, `notify/config.rs`, `tls/config.rs`,
//! `web/config.rs`, `identity/config.rs`, …) while `config.rs` only puts them together.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::secret::Secret;

/// A key of a section that does not validate: the dotted key (`tls.listen[0]`) and why.
/// `config.rs` adds the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}`: {message}")]
pub struct Invalid {
    pub key: String,
    pub message: String,
}

impl Invalid {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Environment lookups, injectable for tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment; an empty variable counts as unset.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// `path` as written in the config, made absolute against the config file's folder.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// Read a secret file, refusing one that group or others may read or write.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:04o}; a secret file must not be accessible by group or others \
             (chmod 600 {})",
            path.display(),
            path.display()
        ));
    }
    if meta.len() > 64 * 1024 {
        return Err(format!("{} is larger than 64 KiB", path.display()));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(Secret::new(text))
}

/// An environment of fixed variables, for the config tests of every section.
#[cfg(test)]
pub(crate) mod test_env {
    use std::collections::HashMap;

    pub(crate) struct MapEnv(HashMap<String, String>);

    impl super::Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }

    pub(crate) fn env(pairs: &[(&str, &str)]) -> MapEnv {
        MapEnv(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_the_key() {
        let e = Invalid::new("tls.listen[0]", "\"x\" is not an IP:port address");
        assert_eq!(
            e.to_string(),
            "`tls.listen[0]`: \"x\" is not an IP:port address"
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_base() {
        let base = Path::new("/etc/botcreds");
        assert_eq!(
            resolve(base, Path::new("p.yaml")),
            PathBuf::from("/etc/botcreds/p.yaml")
        );
        assert_eq!(resolve(base, Path::new("/x/p")), PathBuf::from("/x/p"));
    }
}
