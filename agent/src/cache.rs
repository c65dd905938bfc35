//! The on-disk credential cache: one 0600 JSON file per credential in a 0700 directory, each
//! written atomically (temp file, fsync, rename, fsync of the directory), so that after a restart
//! the agent serves what it had while the broker is down.
//!
//! A file that is not a private regular file of ours is refused; a corrupt or truncated one is
//! removed. Either way the agent just fetches that credential anew: a bad cache never stops it.

use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use botcreds_proto::{Permission, RepoName};
use serde::{Deserialize, Serialize};

use crate::config::Scope;
use crate::secret::Secret;

/// Version of the file layout; files of another version are dropped and refetched.
pub const CACHE_FORMAT: u32 = 1;
const MAX_CACHE_FILE_BYTES: u64 = 64 * 1024;
const TEMP_PREFIX: &str = ".tmp-";

/// One cached credential as stored on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRecord {
    pub format: u32,
    pub protocol: String,
    pub host: String,
    pub repositories: Vec<String>,
    pub permissions: Vec<String>,
    pub credential_id: String,
    pub token: Secret,
    /// Unix seconds.
    pub expires_at: i64,
    pub fetched_at: i64,
    #[serde(default)]
    pub last_used: Option<i64>,
}

impl CacheRecord {
    /// The scope the record claims, validated like configuration.
    pub fn scope(&self) -> Result<Scope, String> {
        let repos = self
            .repositories
            .iter()
            .map(|r| r.parse::<RepoName>().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let perms = self
            .permissions
            .iter()
            .map(|p| p.parse::<Permission>().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        if repos.is_empty() || perms.is_empty() {
            return Err("names no repository or no permission".into());
        }
        Ok(Scope::new(&self.protocol, &self.host, repos, perms))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache_dir {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cache_dir {path} is not a directory")]
    NotDirectory { path: PathBuf },
    #[error("cache_dir {path} belongs to uid {owner}, not to the agent's uid {uid}")]
    NotOwned { path: PathBuf, owner: u32, uid: u32 },
}

/// A record read back at startup.
#[derive(Debug)]
pub struct Loaded {
    pub file_name: String,
    pub record: CacheRecord,
}

/// A cache file that was not used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file_name: String,
    pub reason: String,
}

/// Which broker, and which identity towards it, a cache was written for. Every file a bound
/// cache writes starts with this as a JSON line; a file naming another broker or identity (or
/// none: written before records were bound) is removed at load, never served — a restart with
/// agent.toml pointed elsewhere must not hand out the old broker's tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheBinding {
    /// The broker URL as configured (normalized).
    pub broker: String,
    /// A fingerprint of the agent's identity: `tailnet`, a hash of the API key, or the mTLS
    /// bot and CA ([`crate::broker_client::Auth::fingerprint`]).
    pub identity: String,
}

/// The cache directory.
#[derive(Debug, Clone)]
pub struct DiskCache {
    dir: PathBuf,
    uid: u32,
    /// `None` only for a cache opened without an agent identity (tests, tools): files are then
    /// written and read without a binding line.
    binding: Option<CacheBinding>,
}

impl DiskCache {
    /// Creates the directory (0700) if needed; tightens a looser mode on one we own.
    pub fn open(dir: &Path) -> Result<DiskCache, CacheError> {
        let io_err = |source| CacheError::Io {
            path: dir.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err)?;
        let meta = fs::symlink_metadata(dir).map_err(io_err)?;
        if !meta.is_dir() {
            return Err(CacheError::NotDirectory {
                path: dir.to_path_buf(),
            });
        }
        let uid = rustix::process::geteuid().as_raw();
        if meta.uid() != uid {
            return Err(CacheError::NotOwned {
                path: dir.to_path_buf(),
                owner: meta.uid(),
                uid,
            });
        }
        if meta.mode() & 0o077 != 0 {
            tracing::warn!(
                cache_dir = %dir.display(),
                mode = format!("{:o}", meta.mode() & 0o7777),
                "cache directory is accessible to others; setting it to 0700"
            );
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err)?;
        }
        Ok(DiskCache {
            dir: dir.to_path_buf(),
            uid,
            binding: None,
        })
    }

    /// From now on, write every file bound to `binding` and refuse files bound to anything
    /// else.
    pub fn bound_to(mut self, binding: CacheBinding) -> DiskCache {
        self.binding = Some(binding);
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads every cache file. Leftover temp files (a crash mid-write) and corrupt files are
    /// removed; files with loose permissions or another owner are left alone and not used.
    pub fn load(&self) -> io::Result<(Vec<Loaded>, Vec<Problem>)> {
        let mut loaded = Vec::new();
        let mut problems = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            if !is_cache_file_name(&name) {
                continue;
            }
            match self.read_record(&entry.path()) {
                Ok(record) => match record.scope() {
                    Ok(scope) if scope.cache_file_name() == name => loaded.push(Loaded {
                        file_name: name,
                        record,
                    }),
                    Ok(_) => {
                        let _ = fs::remove_file(entry.path());
                        problems.push(Problem {
                            file_name: name,
                            reason: "its name does not match its contents; removed".into(),
                        });
                    }
                    Err(e) => {
                        let _ = fs::remove_file(entry.path());
                        problems.push(Problem {
                            file_name: name,
                            reason: format!("invalid scope ({e}); removed"),
                        });
                    }
                },
                Err(ReadError::Refused(reason)) => problems.push(Problem {
                    file_name: name,
                    reason,
                }),
                Err(ReadError::Corrupt(reason)) => {
                    let _ = fs::remove_file(entry.path());
                    problems.push(Problem {
                        file_name: name,
                        reason: format!("{reason}; removed"),
                    });
                }
            }
        }
        loaded.sort_by(|a, b| a.file_name.cmp(&b.file_name));
        Ok((loaded, problems))
    }

    fn read_record(&self, path: &Path) -> Result<CacheRecord, ReadError> {
        let text = self.read_bound(path)?;
        let record: CacheRecord = serde_json::from_str(&text)
            .map_err(|e| ReadError::Corrupt(format!("is corrupt or truncated ({e})")))?;
        if record.format != CACHE_FORMAT {
            return Err(ReadError::Corrupt(format!(
                "has cache format {}",
                record.format
            )));
        }
        Ok(record)
    }

    /// Reads `file_name` in the cache directory as text, if it is a private regular file of
    /// ours (not a symlink, mode 0600 or stricter, at most 64 KiB). For other kinds of cached
    /// records (LiteLLM keys) that share the directory and its rules.
    pub fn read_private(&self, file_name: &str) -> Result<String, ReadError> {
        self.read_bound(&self.dir.join(file_name))
    }

    /// The file's record after its binding line, if that line names this cache's broker and
    /// identity; a mismatch is [`ReadError::Corrupt`] (the caller removes it).
    fn read_bound(&self, path: &Path) -> Result<String, ReadError> {
        let text = self.read_private_path(path)?;
        let Some(want) = &self.binding else {
            return Ok(text);
        };
        let other = || ReadError::Corrupt("was written for another broker or identity".into());
        let (line, record) = text.split_once('\n').ok_or_else(other)?;
        match serde_json::from_str::<CacheBinding>(line) {
            Ok(got) if got == *want => Ok(record.to_string()),
            _ => Err(other()),
        }
    }

    /// Names of the files in the cache directory that start with `prefix` (temp files excluded).
    pub fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            if let Some(name) = entry?.file_name().to_str()
                && name.starts_with(prefix)
                && !name.starts_with(TEMP_PREFIX)
            {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn read_private_path(&self, path: &Path) -> Result<String, ReadError> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => ReadError::Refused("is a symbolic link; refused".into()),
                _ => ReadError::Refused(format!("cannot be opened ({e}); refused")),
            })?;
        let meta = file
            .metadata()
            .map_err(|e| ReadError::Refused(format!("cannot be inspected ({e}); refused")))?;
        if !meta.is_file() {
            return Err(ReadError::Refused("is not a regular file; refused".into()));
        }
        if meta.uid() != self.uid {
            return Err(ReadError::Refused(format!(
                "belongs to uid {}, not to the agent's uid {}; refused",
                meta.uid(),
                self.uid
            )));
        }
        if meta.mode() & 0o077 != 0 {
            return Err(ReadError::Refused(format!(
                "has mode {:o}, readable by others; refused (cache files must be 0600)",
                meta.mode() & 0o7777
            )));
        }
        if meta.len() > MAX_CACHE_FILE_BYTES {
            return Err(ReadError::Corrupt(format!(
                "is larger than {MAX_CACHE_FILE_BYTES} bytes"
            )));
        }
        let mut text = String::new();
        file.take(MAX_CACHE_FILE_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| ReadError::Corrupt(format!("cannot be read as text ({e})")))?;
        Ok(text)
    }

    /// Writes `record` as `file_name`, replacing any previous file in one step.
    pub fn store(&self, file_name: &str, record: &CacheRecord) -> io::Result<()> {
        let json = serde_json::to_vec(record).map_err(io::Error::other)?;
        self.store_bytes(file_name, &json)
    }

    /// Writes `json` as `file_name` (mode 0600), replacing any previous file in one step.
    pub fn store_bytes(&self, file_name: &str, json: &[u8]) -> io::Result<()> {
        let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(json.len() + 256));
        if let Some(binding) = &self.binding {
            serde_json::to_writer(&mut *bytes, binding).map_err(io::Error::other)?;
            bytes.push(b'\n');
        }
        bytes.extend_from_slice(json);
        crate::atomic::replace(
            &self.dir,
            &crate::atomic::temp_name(&format!("{TEMP_PREFIX}{file_name}-")),
            &self.dir.join(file_name),
            0o600,
            &bytes,
            |_| Ok(()),
        )
    }

    /// Removes `file_name`; a file already gone is fine.
    pub fn remove(&self, file_name: &str) -> io::Result<()> {
        match fs::remove_file(self.dir.join(file_name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Why a cache file was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// Not ours or not private: leave it alone and do not trust it.
    Refused(String),
    /// Ours but unusable: remove it.
    Corrupt(String),
}

fn is_cache_file_name(name: &str) -> bool {
    name.strip_suffix(".json").is_some_and(|stem| {
        stem.len() == 32 && stem.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(repo: &str, token: &str) -> (String, CacheRecord) {
        let r = CacheRecord {
            format: CACHE_FORMAT,
            protocol: "https".into(),
            host: "github.com".into(),
            repositories: vec![repo.into()],
            permissions: vec!["contents:read".into()],
            credential_id: "tok_1".into(),
            token: Secret::new(token.into()),
            expires_at: 2_000_000_000,
            fetched_at: 1_999_996_400,
            last_used: None,
        };
        (r.scope().unwrap().cache_file_name(), r)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn creates_private_directory_and_tightens_a_loose_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        DiskCache::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        DiskCache::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let file = tmp.path().join("file");
        fs::write(&file, "x").unwrap();
        assert!(matches!(
            DiskCache::open(&file),
            Err(CacheError::Io { .. } | CacheError::NotDirectory { .. })
        ));
    }

    #[test]
    fn store_is_atomic_private_and_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path()).unwrap();
        let (name, old) = record("acme/web", "ghs_old");
        cache.store(&name, &old).unwrap();
        let path = tmp.path().join(&name);
        assert_eq!(mode(&path), 0o600);

        // A reader holding the old file keeps seeing it whole: the new version arrives by
        // rename, never by rewriting the old file in place.
        let mut held = fs::File::open(&path).unwrap();
        let (_, new) = record("acme/web", "ghs_new");
        cache.store(&name, &new).unwrap();
        let mut before = String::new();
        held.read_to_string(&mut before).unwrap();
        assert!(before.contains("ghs_old"), "{before}");
        assert!(fs::read_to_string(&path).unwrap().contains("ghs_new"));

        let (loaded, problems) = cache.load().unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].record, new);
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp files left: {names:?}");
    }

    #[test]
    fn leftover_temp_files_are_ignored_and_cleaned() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path()).unwrap();
        let (name, r) = record("acme/web", "ghs_1");
        cache.store(&name, &r).unwrap();
        let temp = tmp.path().join(format!("{TEMP_PREFIX}{name}-1-1"));
        fs::write(&temp, "{\"format\":1,\"prot").unwrap();
        let (loaded, problems) = cache.load().unwrap();
        assert_eq!((loaded.len(), problems.len()), (1, 0));
        assert!(!temp.exists());
    }

    #[test]
    fn loose_or_foreign_files_are_refused_and_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path()).unwrap();
        let (name, r) = record("acme/web", "ghs_1");
        cache.store(&name, &r).unwrap();
        let path = tmp.path().join(&name);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let (loaded, problems) = cache.load().unwrap();
        assert!(loaded.is_empty());
        assert_eq!(problems.len(), 1);
        assert!(problems[0].reason.contains("mode 644"), "{problems:?}");
        assert!(path.exists(), "refused, not deleted");

        // The next fetch replaces it with a private file.
        cache.store(&name, &r).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(cache.load().unwrap().0.len(), 1);

        // A symlink planted under a cache name is not followed.
        let (other, _) = record("acme/api", "x");
        let target = tmp.path().join("elsewhere");
        fs::write(&target, "{}").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&target, tmp.path().join(&other)).unwrap();
        let (_, problems) = cache.load().unwrap();
        assert!(
            problems
                .iter()
                .any(|p| p.file_name == other && p.reason.contains("symbolic link")),
            "{problems:?}"
        );
    }

    #[test]
    fn corrupt_or_truncated_files_are_dropped_with_a_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path()).unwrap();
        let (name, r) = record("acme/web", "ghs_1");
        let full = serde_json::to_string(&r).unwrap();
        let mut wrong_format = r.clone();
        wrong_format.format = 99;
        let mut bad_scope = r.clone();
        bad_scope.repositories = vec!["not-a-repo".into()];
        let (other_name, _) = record("acme/other", "x");
        let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
            (
                "truncated",
                full.as_bytes()[..full.len() / 2].to_vec(),
                &name,
                "corrupt or truncated",
            ),
            ("empty", vec![], &name, "corrupt or truncated"),
            (
                "garbage",
                b"\xff\xfe\x00garbage".to_vec(),
                &name,
                "cannot be read as text",
            ),
            (
                "huge",
                vec![b' '; MAX_CACHE_FILE_BYTES as usize + 1],
                &name,
                "larger than",
            ),
            (
                "unknown format",
                serde_json::to_vec(&wrong_format).unwrap(),
                &name,
                "cache format 99",
            ),
            (
                "bad scope",
                serde_json::to_vec(&bad_scope).unwrap(),
                &name,
                "invalid scope",
            ),
            (
                "renamed",
                full.clone().into_bytes(),
                &other_name,
                "does not match",
            ),
        ];
        for (what, bytes, file, want) in cases {
            let path = tmp.path().join(file);
            fs::write(&path, &bytes).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            let (loaded, problems) = cache.load().unwrap();
            assert!(loaded.is_empty(), "{what}");
            assert_eq!(problems.len(), 1, "{what}: {problems:?}");
            assert!(
                problems[0].reason.contains(want),
                "{what}: {}",
                problems[0].reason
            );
            assert!(!path.exists(), "{what}: removed");
        }
    }

    #[test]
    fn remove_tolerates_missing_files_and_unrelated_files_are_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path()).unwrap();
        cache
            .remove("0123456789abcdef0123456789abcdef.json")
            .unwrap();
        fs::write(tmp.path().join("README"), "hello").unwrap();
        let (loaded, problems) = cache.load().unwrap();
        assert!(loaded.is_empty() && problems.is_empty());
    }

    /// A cache written while talking to one broker with one identity is not served after the
    /// agent is pointed at another broker or identity (GitHub and LiteLLM records alike).
    #[test]
    fn cache_from_another_broker_or_identity_is_not_served() {
        let tmp = tempfile::tempdir().unwrap();
        let binding = |broker: &str, identity: &str| CacheBinding {
            broker: broker.into(),
            identity: identity.into(),
        };
        let a = DiskCache::open(tmp.path())
            .unwrap()
            .bound_to(binding("https://a.example", "api_key:1"));
        let (name, r) = record("acme/web", "ghs_a");
        let litellm_name = "litellm-0123.json";
        let cases = [
            (
                "same broker and identity",
                binding("https://a.example", "api_key:1"),
                true,
            ),
            (
                "another broker",
                binding("https://b.example", "api_key:1"),
                false,
            ),
            (
                "another identity",
                binding("https://a.example", "api_key:2"),
                false,
            ),
            (
                "tailnet instead of a key",
                binding("https://a.example", "tailnet"),
                false,
            ),
        ];
        for (what, other, served) in cases {
            a.store(&name, &r).unwrap();
            a.store_bytes(litellm_name, br#"{"key":"sk-a"}"#).unwrap();
            let b = DiskCache::open(tmp.path()).unwrap().bound_to(other);
            let (loaded, problems) = b.load().unwrap();
            let litellm = b.read_private(litellm_name);
            if served {
                assert_eq!(loaded.len(), 1, "{what}: {problems:?}");
                assert_eq!(loaded[0].record, r, "{what}");
                assert_eq!(litellm.unwrap(), r#"{"key":"sk-a"}"#, "{what}");
            } else {
                assert!(loaded.is_empty(), "{what}: served");
                assert!(
                    problems[0].reason.contains("another broker or identity"),
                    "{what}: {problems:?}"
                );
                assert!(!tmp.path().join(&name).exists(), "{what}: removed");
                assert!(
                    matches!(&litellm, Err(ReadError::Corrupt(m)) if m.contains("another broker or identity")),
                    "{what}: {litellm:?}"
                );
            }
        }
        // A file from before records were bound names no broker: not trusted either.
        fs::write(tmp.path().join(&name), serde_json::to_vec(&r).unwrap()).unwrap();
        fs::set_permissions(tmp.path().join(&name), fs::Permissions::from_mode(0o600)).unwrap();
        let (loaded, problems) = a.load().unwrap();
        assert!(loaded.is_empty(), "{problems:?}");
    }

    #[test]
    fn debug_of_a_record_hides_the_token() {
        let (_, r) = record("acme/web", "ghs_topsecret");
        assert!(!format!("{r:?}").contains("topsecret"));
    }
}
