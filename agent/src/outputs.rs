//! The files a LiteLLM key is written to: the key file, an env file, and the settings of Roo Code
//! and OpenCode (merged into what the user already has there), each replaced atomically so that
//! a reader never sees a partial or empty key.
//!
//! Every write goes to a temp file in the target's own directory (created `O_EXCL`, never
//! following a symlink), which gets its mode and group, is fsynced, renamed over the target, and
//! then the directory is fsynced.
//!
//! The agent usually runs as root and writes into directories its users control (their home).
//! So the target's directory is opened one component at a time with `O_NOFOLLOW` and every step
//! after that goes through the open descriptor (`openat`, `renameat`, `unlinkat`): a symlink on
//! the way is followed only when only root could have made it, a tool config that is a symlink
//! or has other hard links is never read, and a user swapping in a link meanwhile gains nothing. When the key goes away (revoked, expired, released) the key
//! and env files are removed — a reader sees "no file", never an empty or stale key — and the
//! key field alone is removed from the tool configs, which keep everything else.
//!
//! A tool config that exists but is not a JSON object (or whose sections the agent would merge
//! into are not objects) is never overwritten: the agent reports the problem and leaves the
//! file exactly as it is, so a user's settings are never lost to a parse error.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use serde_json::{Map, Value};

/// Roo Code's profile name the agent manages, as in the key-provisioner design.
pub const ROO_PROFILE: &str = "LiteLLM";
/// OpenCode's provider id the agent manages (models are then `litellm/<model>`).
pub const OPENCODE_PROVIDER: &str = "litellm";
/// OpenCode's schema URL, written only into a config the agent creates.
pub const OPENCODE_SCHEMA: &str = "https://opencode.ai/config.json";
/// Existing tool configs larger than this are not read (and not touched).
const MAX_TOOL_CONFIG_BYTES: u64 = 1024 * 1024;
const TEMP_MARKER: &str = ".botcreds-tmp-";

/// The kinds of file an entry writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    KeyFile,
    EnvFile,
    RooCode,
    OpenCode,
}

impl OutputKind {
    /// The `agent.toml` key that configures it.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::KeyFile => "key_file",
            OutputKind::EnvFile => "env_file",
            OutputKind::RooCode => "roo_code",
            OutputKind::OpenCode => "opencode",
        }
    }

    pub fn from_key(key: &str) -> Option<OutputKind> {
        match key {
            "key_file" => Some(OutputKind::KeyFile),
            "env_file" => Some(OutputKind::EnvFile),
            "roo_code" => Some(OutputKind::RooCode),
            "opencode" => Some(OutputKind::OpenCode),
            _ => None,
        }
    }
}

/// What the files should say: the key, the proxy's OpenAI-compatible base URL, its models.
pub struct KeyMaterial<'a> {
    pub key: &'a str,
    pub base_url: &'a str,
    pub models: &'a [String],
    /// The configured `model`, if any.
    pub model: Option<&'a str>,
}

/// How a file is created: its mode and (optionally) group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSpec {
    pub mode: u32,
    pub group: Option<u32>,
}

/// What a sync did to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Replaced (or created) with new content.
    Written,
    /// Removed, or the key removed from it.
    Removed,
    /// Already as wanted.
    Unchanged,
}

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// An existing tool config the agent will not rewrite.
    #[error(
        "{path}: {message}; left untouched (fix or remove it and the agent writes the key on its next check)"
    )]
    Refused { path: PathBuf, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OutputError + '_ {
    move |source| OutputError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Brings `path` in line with `key`: written when `Some`, the key removed when `None`.
pub fn sync(
    kind: OutputKind,
    path: &Path,
    spec: FileSpec,
    key: Option<&KeyMaterial<'_>>,
) -> Result<Outcome, OutputError> {
    match kind {
        OutputKind::KeyFile | OutputKind::EnvFile => {
            let Some(key) = key else {
                return remove_file(path);
            };
            let content = match kind {
                OutputKind::KeyFile => key_file_content(key.key),
                _ => {
                    env_file_content(key.key, key.base_url).ok_or_else(|| OutputError::Refused {
                        path: path.to_path_buf(),
                        message: "the key or base URL holds a control character".into(),
                    })?
                }
            };
            let place = Place::open(path, Some(spec)).map_err(io_err(path))?;
            if place
                .is_current(content.as_bytes(), spec)
                .map_err(io_err(path))?
            {
                return Ok(Outcome::Unchanged);
            }
            place
                .write(content.as_bytes(), spec)
                .map_err(io_err(path))?;
            Ok(Outcome::Written)
        }
        OutputKind::RooCode | OutputKind::OpenCode => {
            let place = match Place::open(path, None) {
                Ok(place) => Some(place),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err(path)(e)),
            };
            let existing = match &place {
                Some(place) => place.read_tool_config()?,
                None => None,
            };
            let merged = match kind {
                OutputKind::RooCode => roo_code_merge(existing.as_ref(), key),
                _ => opencode_merge(existing.as_ref(), key),
            }
            .map_err(|message| OutputError::Refused {
                path: path.to_path_buf(),
                message,
            })?;
            let Some(merged) = merged else {
                return Ok(Outcome::Unchanged);
            };
            let has_mode = match &place {
                Some(place) => place.has_mode(spec).map_err(io_err(path))?,
                None => false,
            };
            if existing.as_ref() == Some(&merged) && (key.is_none() || has_mode) {
                // Same settings (however the user formatted them); a file without our key
                // needs no new mode either.
                return Ok(Outcome::Unchanged);
            }
            let mut text = serde_json::to_string_pretty(&merged).map_err(|e| OutputError::Io {
                path: path.to_path_buf(),
                source: io::Error::other(e),
            })?;
            text.push('\n');
            let place = match place {
                Some(place) => place,
                None => Place::open(path, Some(spec)).map_err(io_err(path))?,
            };
            place.write(text.as_bytes(), spec).map_err(io_err(path))?;
            Ok(if key.is_some() {
                Outcome::Written
            } else {
                Outcome::Removed
            })
        }
    }
}

/// The key file: the key and a newline.
pub fn key_file_content(key: &str) -> String {
    format!("{key}\n")
}

/// The env file, for `set -a; . FILE` and systemd's `EnvironmentFile=`: every value is
/// single-quoted (a `'` in it written as `'\''`), so sourcing the file only ever assigns, whatever
/// the broker sent; both readers take single quotes the same way. `None` when a value holds a
/// control character (a newline would end the assignment for some readers).
pub fn env_file_content(key: &str, base_url: &str) -> Option<String> {
    let key = env_quote(key)?;
    let base_url = env_quote(base_url)?;
    Some(format!(
        "# Written by botcreds-agent; replaced whenever the LiteLLM key changes. Do not edit.\n\
         LITELLM_API_KEY={key}\n\
         LITELLM_BASE_URL={base_url}\n\
         OPENAI_API_KEY={key}\n\
         OPENAI_BASE_URL={base_url}\n"
    ))
}

/// `value` in single quotes for a POSIX shell: nothing inside is special but `'` itself, which
/// closes the quotes, is written escaped and reopens them. Control characters are refused.
fn env_quote(value: &str) -> Option<String> {
    if value.chars().any(char::is_control) {
        return None;
    }
    Some(format!("'{}'", value.replace('\'', "'\\''")))
}

/// Roo Code's settings as the key-provisioner design writes them, merged into `existing`:
/// `apiConfigs.LiteLLM` gets `apiProvider`, `openAiBaseUrl`, `openAiApiKey` and
/// `openAiModelId` (the configured model, else the one already chosen, else the key's first),
/// and `currentApiConfigName` is set to `LiteLLM` only when the user has not chosen another.
/// Everything else is kept. Without a key, only `openAiApiKey` is removed. `Ok(None)`: there is
/// no file and nothing to write.
pub fn roo_code_merge(
    existing: Option<&Value>,
    key: Option<&KeyMaterial<'_>>,
) -> Result<Option<Value>, String> {
    let mut root = match existing {
        None if key.is_none() => return Ok(None),
        None => Value::Object(Map::new()),
        Some(Value::Object(_)) => existing.cloned().unwrap_or_default(),
        Some(_) => return Err("is not a JSON object".into()),
    };
    let obj = as_object(&mut root, "the top level")?;
    let Some(key) = key else {
        if let Some(profile) = obj
            .get_mut("apiConfigs")
            .and_then(Value::as_object_mut)
            .and_then(|c| c.get_mut(ROO_PROFILE))
            .and_then(Value::as_object_mut)
        {
            profile.remove("openAiApiKey");
        }
        return Ok(Some(root));
    };
    if !obj.contains_key("currentApiConfigName") {
        obj.insert("currentApiConfigName".into(), ROO_PROFILE.into());
    }
    let configs = child_object(obj, "apiConfigs")?;
    let profile = child_object(configs, ROO_PROFILE)?;
    let model = key
        .model
        .map(str::to_string)
        .or_else(|| {
            profile
                .get("openAiModelId")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .or_else(|| key.models.first().cloned());
    profile.insert("apiProvider".into(), "openai".into());
    profile.insert("openAiBaseUrl".into(), key.base_url.into());
    profile.insert("openAiApiKey".into(), key.key.into());
    if let Some(model) = model {
        profile.insert("openAiModelId".into(), model.into());
    }
    Ok(Some(root))
}

/// OpenCode's configuration with a custom OpenAI-compatible provider `litellm`, merged into
/// `existing`: `provider.litellm` gets `npm` (`@ai-sdk/openai-compatible`), `name`,
/// `options.baseURL`, `options.apiKey` and an entry per model of the key under `models`
/// (existing model entries kept); the top-level `model` is set to `litellm/<model>` only when
/// the user has not chosen one. Without a key, only `options.apiKey` is removed.
pub fn opencode_merge(
    existing: Option<&Value>,
    key: Option<&KeyMaterial<'_>>,
) -> Result<Option<Value>, String> {
    let mut root = match existing {
        None if key.is_none() => return Ok(None),
        None => {
            let mut m = Map::new();
            m.insert("$schema".into(), OPENCODE_SCHEMA.into());
            Value::Object(m)
        }
        Some(Value::Object(_)) => existing.cloned().unwrap_or_default(),
        Some(_) => return Err("is not a JSON object".into()),
    };
    let obj = as_object(&mut root, "the top level")?;
    let Some(key) = key else {
        if let Some(options) = obj
            .get_mut("provider")
            .and_then(Value::as_object_mut)
            .and_then(|p| p.get_mut(OPENCODE_PROVIDER))
            .and_then(Value::as_object_mut)
            .and_then(|p| p.get_mut("options"))
            .and_then(Value::as_object_mut)
        {
            options.remove("apiKey");
        }
        return Ok(Some(root));
    };
    let chosen = key
        .model
        .map(str::to_string)
        .or_else(|| key.models.first().cloned());
    if let Some(model) = &chosen
        && !obj.contains_key("model")
    {
        obj.insert(
            "model".into(),
            format!("{OPENCODE_PROVIDER}/{model}").into(),
        );
    }
    let providers = child_object(obj, "provider")?;
    let provider = child_object(providers, OPENCODE_PROVIDER)?;
    provider.insert("npm".into(), "@ai-sdk/openai-compatible".into());
    if !provider.contains_key("name") {
        provider.insert("name".into(), "LiteLLM".into());
    }
    let options = child_object(provider, "options")?;
    options.insert("baseURL".into(), key.base_url.into());
    options.insert("apiKey".into(), key.key.into());
    let models = child_object(provider, "models")?;
    for model in key
        .models
        .iter()
        .chain(key.model.map(str::to_string).iter())
    {
        if !models.contains_key(model) {
            let mut entry = Map::new();
            entry.insert("name".into(), model.clone().into());
            models.insert(model.clone(), Value::Object(entry));
        }
    }
    Ok(Some(root))
}

fn as_object<'a>(v: &'a mut Value, what: &str) -> Result<&'a mut Map<String, Value>, String> {
    v.as_object_mut()
        .ok_or_else(|| format!("{what} is not a JSON object"))
}

/// `parent[name]`, created as `{}` if missing; an error if it is something else.
fn child_object<'a>(
    parent: &'a mut Map<String, Value>,
    name: &str,
) -> Result<&'a mut Map<String, Value>, String> {
    parent
        .entry(name.to_string())
        .or_insert_with(|| Value::Object(Map::new()))
        .as_object_mut()
        .ok_or_else(|| format!("\"{name}\" is not a JSON object"))
}

/// The directory of an output, opened one component at a time from `/` without following a
/// symlink that anyone but root could have made, and the output's name in it. Every later step
/// (read, compare, create, rename, remove) goes through this descriptor, so a user who controls
/// a directory on the way (their home, `~/.config`) cannot redirect the agent, which usually
/// runs as root, to another file by swapping in a symlink, before or during the write.
struct Place<'a> {
    path: &'a Path,
    dir: OwnedFd,
    name: &'a OsStr,
}

/// Symlinks followed on the way to one output at most (like the kernel's `ELOOP` limit).
const MAX_LINKS: usize = 40;

impl<'a> Place<'a> {
    /// Opens the directory of `path`; with `create`, missing directories are made (0700, or
    /// 0750 and the entry's group). A component that is a symlink is followed only when root
    /// owns it and the directory holding it, and only root may change that directory.
    fn open(path: &'a Path, create: Option<FileSpec>) -> io::Result<Place<'a>> {
        let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
        if !path.is_absolute() {
            return Err(invalid("the path is not absolute"));
        }
        let name = path
            .file_name()
            .ok_or_else(|| invalid("the path names no file"))?;
        let dir = parent_dir(path)?;
        Ok(Place {
            path,
            dir: open_dir(dir, create)?,
            name,
        })
    }

    /// Opens the output for reading, never through a symlink (`ELOOP`) and never blocking on a
    /// FIFO.
    fn open_file(&self) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.dir,
            self.name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    /// The tool config as JSON, `None` if there is no file. A file that is not valid JSON is an
    /// error, so that it is never replaced. A symlink or a file with other hard links is not
    /// read: it may be another user's or root's file, whose content would end up in the config
    /// the agent writes.
    fn read_tool_config(&self) -> Result<Option<Value>, OutputError> {
        let path = self.path;
        let refused = |message: String| OutputError::Refused {
            path: path.to_path_buf(),
            message,
        };
        let file = match self.open_file() {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(refused(
                    "is a symbolic link; the agent does not follow it (point the entry at the real file)"
                        .into(),
                ));
            }
            Err(e) => return Err(io_err(path)(e)),
        };
        let meta = file.metadata().map_err(io_err(path))?;
        if !meta.is_file() {
            return Err(refused("is not a regular file".into()));
        }
        if meta.nlink() > 1 {
            return Err(refused(
                "has other hard links; the agent does not read it".into(),
            ));
        }
        if meta.len() > MAX_TOOL_CONFIG_BYTES {
            return Err(refused(format!(
                "is larger than {MAX_TOOL_CONFIG_BYTES} bytes"
            )));
        }
        let mut text = String::new();
        file.take(MAX_TOOL_CONFIG_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| refused(format!("cannot be read as UTF-8 text ({e})")))?;
        if text.trim().is_empty() {
            // An empty file holds no settings to lose.
            return Ok(Some(Value::Object(Map::new())));
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| refused(format!("is not valid JSON ({e})")))
    }

    /// Whether the output is a regular file (not a symlink) with the wanted mode and group.
    fn has_mode(&self, spec: FileSpec) -> io::Result<bool> {
        let st = match rustix::fs::statat(&self.dir, self.name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        Ok(FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
            && st.st_mode & 0o7777 == spec.mode
            && spec.group.is_none_or(|g| g == st.st_gid))
    }

    /// Whether the output already holds exactly `content` with the wanted mode and group.
    fn is_current(&self, content: &[u8], spec: FileSpec) -> io::Result<bool> {
        if !self.has_mode(spec)? {
            return Ok(false);
        }
        let mut file = match self.open_file() {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(false),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        if !meta.is_file() || meta.len() != content.len() as u64 {
            return Ok(false);
        }
        let mut on_disk = Vec::with_capacity(content.len());
        (&mut file)
            .take(content.len() as u64 + 1)
            .read_to_end(&mut on_disk)?;
        Ok(on_disk == content)
    }

    /// Replaces the output with `content` in one step: temp file in the same directory (mode
    /// and group set before any byte is written), fsync, rename, fsync of the directory.
    fn write(&self, content: &[u8], spec: FileSpec) -> io::Result<()> {
        let prefix = format!(".{}{TEMP_MARKER}", self.name.to_string_lossy());
        crate::atomic::replace_at(
            &self.dir,
            &crate::atomic::temp_name(&prefix),
            self.name,
            spec.mode,
            content,
            |f| match spec.group {
                Some(gid) => chown_group(f, gid),
                None => Ok(()),
            },
        )?;
        self.remove_stale_temps(&prefix);
        Ok(())
    }

    /// Removes temp files of this output left by an agent killed mid-write (they hold a key),
    /// but not this process's own (another write of the same path may be under way). Best
    /// effort: a leftover costs nothing but the space.
    fn remove_stale_temps(&self, prefix: &str) {
        let ours = format!("{prefix}{}-", std::process::id());
        let Ok(dir) = rustix::fs::Dir::read_from(&self.dir) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_bytes();
            if name.starts_with(prefix.as_bytes())
                && !name.starts_with(ours.as_bytes())
                && entry.file_type() == FileType::RegularFile
            {
                let _ = rustix::fs::unlinkat(&self.dir, entry.file_name(), AtFlags::empty());
            }
        }
    }
}

/// Opens directory `dir` (absolute) as described at [`Place::open`].
fn open_dir(dir: &Path, create: Option<FileSpec>) -> io::Result<OwnedFd> {
    // Walking needs only search permission on each directory (`O_PATH`), as path lookup
    // does; the last one is opened for reading at the end (fsync, listing).
    const DIR: OFlags = OFlags::PATH
        .union(OFlags::DIRECTORY)
        .union(OFlags::NOFOLLOW)
        .union(OFlags::CLOEXEC);
    const OPEN_DIR: OFlags = OFlags::RDONLY
        .union(OFlags::DIRECTORY)
        .union(OFlags::NOFOLLOW)
        .union(OFlags::CLOEXEC);
    let root = || rustix::fs::open("/", DIR, Mode::empty());
    // Components still to walk, the next one last.
    let mut pending: Vec<OsString> = Vec::new();
    push_components(&mut pending, dir)?;
    let mut fd = root()?;
    let mut walked = PathBuf::from("/");
    let mut links = 0;
    while let Some(name) = pending.pop() {
        match rustix::fs::openat(&fd, &name, DIR, Mode::empty()) {
            Ok(next) => {
                fd = next;
                walked.push(&name);
            }
            Err(rustix::io::Errno::NOENT) if create.is_some() => {
                let spec = create.unwrap_or(FileSpec {
                    mode: 0o600,
                    group: None,
                });
                let mode = if spec.group.is_some() { 0o750 } else { 0o700 };
                match rustix::fs::mkdirat(&fd, &name, Mode::from_raw_mode(mode)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                let next = rustix::fs::openat(&fd, &name, OPEN_DIR, Mode::empty())?;
                // Exactly this mode, whatever the umask.
                rustix::fs::fchmod(&next, Mode::from_raw_mode(mode))?;
                if let Some(gid) = spec.group {
                    rustix::fs::fchown(&next, None, Some(rustix::fs::Gid::from_raw(gid)))?;
                }
                fd = next;
                walked.push(&name);
            }
            Err(e @ (rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR)) => {
                let st = rustix::fs::statat(&fd, &name, AtFlags::SYMLINK_NOFOLLOW)?;
                if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
                    return Err(e.into());
                }
                let holder = rustix::fs::fstat(&fd)?;
                let only_root_could_make_it =
                    st.st_uid == 0 && holder.st_uid == 0 && holder.st_mode & 0o022 == 0;
                if !only_root_could_make_it {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!(
                            "{} is a symbolic link someone other than root could have made;                              the agent does not follow it",
                            walked.join(&name).display()
                        ),
                    ));
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(rustix::io::Errno::LOOP.into());
                }
                let target = rustix::fs::readlinkat(&fd, &name, Vec::new())?;
                let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                if target.is_absolute() {
                    fd = root()?;
                    walked = PathBuf::from("/");
                }
                push_components(&mut pending, &target)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(rustix::fs::openat(&fd, ".", OPEN_DIR, Mode::empty())?)
}

/// Pushes the components of `path` onto `pending` so that its first one is popped next. `..`
/// is refused: the walk holds descriptors, not names, and never goes back up.
fn push_components(pending: &mut Vec<OsString>, path: &Path) -> io::Result<()> {
    let mut names = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => names.push(n.to_os_string()),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} has a \"..\" component", path.display()),
                ));
            }
        }
    }
    pending.extend(names.into_iter().rev());
    Ok(())
}

/// Replaces `path` with `content` in one step (see [`Place`]); a missing directory is created
/// (0700, or 0750 with the entry's group).
pub fn write_atomic(path: &Path, content: &[u8], spec: FileSpec) -> io::Result<()> {
    Place::open(path, Some(spec))?.write(content, spec)
}

/// Removes `path` (the key or env file); already gone is fine.
fn remove_file(path: &Path) -> Result<Outcome, OutputError> {
    let place = match Place::open(path, None) {
        Ok(place) => place,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Outcome::Unchanged),
        Err(e) => return Err(io_err(path)(e)),
    };
    match rustix::fs::unlinkat(&place.dir, place.name, AtFlags::empty()) {
        Ok(()) => {
            let _ = rustix::fs::fsync(&place.dir);
            Ok(Outcome::Removed)
        }
        Err(rustix::io::Errno::NOENT) => Ok(Outcome::Unchanged),
        Err(e) => Err(io_err(path)(e.into())),
    }
}

fn parent_dir(path: &Path) -> io::Result<&Path> {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no directory"))
}

fn chown_group(f: &File, gid: u32) -> io::Result<()> {
    rustix::fs::fchown(f, None, Some(rustix::fs::Gid::from_raw(gid)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use serde_json::json;

    const PRIVATE: FileSpec = FileSpec {
        mode: 0o600,
        group: None,
    };

    fn models() -> Vec<String> {
        vec!["claude-sonnet-4-5".into(), "claude-haiku-3-5".into()]
    }

    fn material<'a>(key: &'a str, models: &'a [String]) -> KeyMaterial<'a> {
        KeyMaterial {
            key,
            base_url: "http://localhost:4000/v1",
            models,
            model: None,
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o7777
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn roo_code_new_file_is_exactly_the_design_shape() {
        let m = models();
        let v = roo_code_merge(None, Some(&material("sk-litellm-ws-abc123", &m)))
            .unwrap()
            .unwrap();
        assert_eq!(
            v,
            json!({
              "currentApiConfigName": "LiteLLM",
              "apiConfigs": {
                "LiteLLM": {
                  "apiProvider": "openai",
                  "openAiBaseUrl": "http://localhost:4000/v1",
                  "openAiApiKey": "sk-litellm-ws-abc123",
                  "openAiModelId": "claude-sonnet-4-5"
                }
              }
            })
        );
        assert_eq!(roo_code_merge(None, None).unwrap(), None, "no file, no key");
    }

    #[test]
    fn roo_code_merge_keeps_the_users_settings() {
        let m = models();
        let existing = json!({
            "currentApiConfigName": "Mine",
            "theme": "dark",
            "apiConfigs": {
                "Mine": {"apiProvider": "anthropic", "apiKey": "user-own"},
                "LiteLLM": {"openAiApiKey": "sk-old", "openAiModelId": "claude-haiku-3-5", "temperature": 0.2}
            }
        });
        let v = roo_code_merge(Some(&existing), Some(&material("sk-new", &m)))
            .unwrap()
            .unwrap();
        assert_eq!(v["currentApiConfigName"], "Mine", "the user's choice stays");
        assert_eq!(v["theme"], "dark");
        assert_eq!(v["apiConfigs"]["Mine"], existing["apiConfigs"]["Mine"]);
        let p = &v["apiConfigs"]["LiteLLM"];
        assert_eq!(p["openAiApiKey"], "sk-new");
        assert_eq!(
            p["openAiModelId"], "claude-haiku-3-5",
            "the chosen model stays"
        );
        assert_eq!(p["temperature"], 0.2);
        assert_eq!(p["apiProvider"], "openai");

        let configured = KeyMaterial {
            model: Some("claude-sonnet-4-5"),
            ..material("sk-new", &m)
        };
        let v = roo_code_merge(Some(&existing), Some(&configured))
            .unwrap()
            .unwrap();
        assert_eq!(
            v["apiConfigs"]["LiteLLM"]["openAiModelId"],
            "claude-sonnet-4-5"
        );

        // Removal takes the key alone.
        let removed = roo_code_merge(Some(&v), None).unwrap().unwrap();
        assert!(
            removed["apiConfigs"]["LiteLLM"]
                .get("openAiApiKey")
                .is_none()
        );
        assert_eq!(removed["apiConfigs"]["LiteLLM"]["temperature"], 0.2);
        assert_eq!(
            removed["apiConfigs"]["Mine"],
            existing["apiConfigs"]["Mine"]
        );

        for bad in [
            json!([1]),
            json!({"apiConfigs": "x"}),
            json!({"apiConfigs": {"LiteLLM": 3}}),
        ] {
            assert!(
                roo_code_merge(Some(&bad), Some(&material("k", &m))).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn opencode_shape_and_merge() {
        let m = models();
        let v = opencode_merge(None, Some(&material("sk-1", &m)))
            .unwrap()
            .unwrap();
        assert_eq!(
            v,
            json!({
              "$schema": "https://opencode.ai/config.json",
              "model": "litellm/claude-sonnet-4-5",
              "provider": {
                "litellm": {
                  "npm": "@ai-sdk/openai-compatible",
                  "name": "LiteLLM",
                  "options": {"baseURL": "http://localhost:4000/v1", "apiKey": "sk-1"},
                  "models": {
                    "claude-sonnet-4-5": {"name": "claude-sonnet-4-5"},
                    "claude-haiku-3-5": {"name": "claude-haiku-3-5"}
                  }
                }
              }
            })
        );
        let existing = json!({
            "model": "anthropic/claude-opus",
            "theme": "tokyonight",
            "provider": {
                "anthropic": {"options": {"apiKey": "user-own"}},
                "litellm": {"name": "My proxy", "options": {"timeout": 30, "apiKey": "sk-old"},
                            "models": {"claude-haiku-3-5": {"name": "Haiku", "limit": {"context": 1}}}}
            }
        });
        let v = opencode_merge(Some(&existing), Some(&material("sk-2", &m)))
            .unwrap()
            .unwrap();
        assert_eq!(v["model"], "anthropic/claude-opus");
        assert_eq!(v["theme"], "tokyonight");
        assert!(v.get("$schema").is_none(), "only written into a new file");
        assert_eq!(
            v["provider"]["anthropic"],
            existing["provider"]["anthropic"]
        );
        let p = &v["provider"]["litellm"];
        assert_eq!(p["name"], "My proxy");
        assert_eq!(p["options"]["timeout"], 30);
        assert_eq!(p["options"]["apiKey"], "sk-2");
        assert_eq!(p["models"]["claude-haiku-3-5"]["name"], "Haiku");
        assert_eq!(
            p["models"]["claude-sonnet-4-5"]["name"],
            "claude-sonnet-4-5"
        );

        let removed = opencode_merge(Some(&v), None).unwrap().unwrap();
        assert!(
            removed["provider"]["litellm"]["options"]
                .get("apiKey")
                .is_none()
        );
        assert_eq!(removed["provider"]["litellm"]["options"]["timeout"], 30);
        assert!(opencode_merge(Some(&json!({"provider": []})), Some(&material("k", &m))).is_err());
    }

    #[test]
    fn key_and_env_files() {
        let tmp = tempfile::tempdir().unwrap();
        let m = models();
        let key = tmp.path().join("sub/dir/key");
        let k = material("sk-abc", &m);
        assert_eq!(
            sync(OutputKind::KeyFile, &key, PRIVATE, Some(&k)).unwrap(),
            Outcome::Written
        );
        assert_eq!(fs::read_to_string(&key).unwrap(), "sk-abc\n");
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(key.parent().unwrap()), 0o700, "created private");
        assert_eq!(
            sync(OutputKind::KeyFile, &key, PRIVATE, Some(&k)).unwrap(),
            Outcome::Unchanged
        );

        // A looser mode on disk is corrected even when the content is right.
        fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        assert_eq!(
            sync(OutputKind::KeyFile, &key, PRIVATE, Some(&k)).unwrap(),
            Outcome::Written
        );
        assert_eq!(mode(&key), 0o600);

        let env = tmp.path().join("env");
        sync(
            OutputKind::EnvFile,
            &env,
            FileSpec {
                mode: 0o640,
                group: None,
            },
            Some(&k),
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(&env).unwrap(),
            "# Written by botcreds-agent; replaced whenever the LiteLLM key changes. Do not edit.\n\
             LITELLM_API_KEY='sk-abc'\nLITELLM_BASE_URL='http://localhost:4000/v1'\n\
             OPENAI_API_KEY='sk-abc'\nOPENAI_BASE_URL='http://localhost:4000/v1'\n"
        );
        assert_eq!(mode(&env), 0o640);

        assert_eq!(
            sync(OutputKind::KeyFile, &key, PRIVATE, None).unwrap(),
            Outcome::Removed
        );
        assert!(
            !key.exists(),
            "a revoked key's file is removed, never emptied"
        );
        assert_eq!(
            sync(OutputKind::KeyFile, &key, PRIVATE, None).unwrap(),
            Outcome::Unchanged
        );
        assert_eq!(
            entries(tmp.path()),
            vec!["env", "sub"],
            "no temp files left"
        );
        assert!(entries(&tmp.path().join("sub/dir")).is_empty());
    }

    /// The group asked for must differ from the one files get anyway (the process's), or the
    /// test passes without any chown: `nogroup` (65534), which the tests (run as root) may give.
    #[test]
    fn group_is_set_when_configured() {
        const NOGROUP: u32 = 65534;
        let tmp = tempfile::tempdir().unwrap();
        assert_ne!(
            rustix::process::getegid().as_raw(),
            NOGROUP,
            "pick another group"
        );
        let m = models();
        let spec = FileSpec {
            mode: 0o640,
            group: Some(NOGROUP),
        };
        for (kind, name) in [
            (OutputKind::KeyFile, "new-dir/key"),
            (OutputKind::EnvFile, "env"),
            (OutputKind::RooCode, "settings.json"),
            (OutputKind::OpenCode, "config.json"),
        ] {
            let path = tmp.path().join(name);
            sync(kind, &path, spec, Some(&material("sk-g", &m))).unwrap();
            let meta = fs::metadata(&path).unwrap();
            assert_eq!(
                (meta.mode() & 0o7777, meta.gid()),
                (0o640, NOGROUP),
                "{name}"
            );
        }
        let dir = fs::metadata(tmp.path().join("new-dir")).unwrap();
        assert_eq!(
            (dir.mode() & 0o7777, dir.gid()),
            (0o750, NOGROUP),
            "a created directory gets the group too"
        );
    }

    #[test]
    fn rewrite_replaces_by_rename_so_readers_never_see_a_partial_key() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("key");
        let m = models();
        sync(
            OutputKind::KeyFile,
            &path,
            PRIVATE,
            Some(&material("sk-old-key", &m)),
        )
        .unwrap();
        let mut held = File::open(&path).unwrap();
        sync(
            OutputKind::KeyFile,
            &path,
            PRIVATE,
            Some(&material("sk-new-key", &m)),
        )
        .unwrap();
        let mut before = String::new();
        held.read_to_string(&mut before).unwrap();
        assert_eq!(
            before, "sk-old-key\n",
            "an open reader keeps the whole old file"
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "sk-new-key\n");
        assert_eq!(entries(tmp.path()), vec!["key"]);
    }

    #[test]
    fn tool_configs_on_disk_merge_and_corrupt_ones_are_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let m = models();
        let k = material("sk-tool", &m);
        let roo = tmp.path().join("roo-code/settings.json");
        fs::create_dir_all(roo.parent().unwrap()).unwrap();
        fs::write(
            &roo,
            r#"{"theme": "dark", "apiConfigs": {"Mine": {"apiKey": "mine"}}}"#,
        )
        .unwrap();
        assert_eq!(
            sync(OutputKind::RooCode, &roo, PRIVATE, Some(&k)).unwrap(),
            Outcome::Written
        );
        let v: Value = serde_json::from_str(&fs::read_to_string(&roo).unwrap()).unwrap();
        assert_eq!(v["theme"], "dark");
        assert_eq!(v["apiConfigs"]["Mine"]["apiKey"], "mine");
        assert_eq!(v["apiConfigs"]["LiteLLM"]["openAiApiKey"], "sk-tool");
        assert_eq!(mode(&roo), 0o600, "it holds the key now");
        assert_eq!(
            sync(OutputKind::RooCode, &roo, PRIVATE, Some(&k)).unwrap(),
            Outcome::Unchanged
        );
        assert_eq!(
            sync(OutputKind::RooCode, &roo, PRIVATE, None).unwrap(),
            Outcome::Removed
        );
        let v: Value = serde_json::from_str(&fs::read_to_string(&roo).unwrap()).unwrap();
        assert!(v["apiConfigs"]["LiteLLM"].get("openAiApiKey").is_none());
        assert_eq!(v["theme"], "dark");
        assert_eq!(
            sync(OutputKind::RooCode, &roo, PRIVATE, None).unwrap(),
            Outcome::Unchanged
        );

        let oc = tmp.path().join("opencode/config.json");
        assert_eq!(
            sync(OutputKind::OpenCode, &oc, PRIVATE, None).unwrap(),
            Outcome::Unchanged
        );
        assert!(!oc.exists(), "no key, no file created");
        assert_eq!(
            sync(OutputKind::OpenCode, &oc, PRIVATE, Some(&k)).unwrap(),
            Outcome::Written
        );
        let v: Value = serde_json::from_str(&fs::read_to_string(&oc).unwrap()).unwrap();
        assert_eq!(v["provider"]["litellm"]["options"]["apiKey"], "sk-tool");

        let corrupt = "{\"theme\": \"dark\", \"apiConfigs\": {";
        fs::write(&roo, corrupt).unwrap();
        let err = sync(OutputKind::RooCode, &roo, PRIVATE, Some(&k))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is not valid JSON") && err.contains("left untouched"),
            "{err}"
        );
        assert!(!err.contains("sk-tool"), "{err}");
        assert_eq!(
            fs::read_to_string(&roo).unwrap(),
            corrupt,
            "not a byte changed"
        );
        fs::write(&roo, "[1, 2]").unwrap();
        let err = sync(OutputKind::RooCode, &roo, PRIVATE, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a JSON object"), "{err}");
        assert_eq!(fs::read_to_string(&roo).unwrap(), "[1, 2]");
        assert_eq!(entries(roo.parent().unwrap()), vec!["settings.json"]);
    }

    /// A temp file left by an agent killed mid-write (it holds a key) goes with the next write
    /// of that file; other files, and temp files of other outputs, stay.
    #[test]
    fn temp_files_of_a_killed_agent_are_removed_at_the_next_write() {
        let tmp = tempfile::tempdir().unwrap();
        let m = models();
        let path = tmp.path().join("key");
        let stale = [".key.botcreds-tmp-999999-0", ".key.botcreds-tmp-1-7"];
        let kept = [
            ".env.botcreds-tmp-999999-0",
            "key.botcreds-tmp-1-1",
            "notes",
        ];
        for name in stale.iter().chain(kept.iter()) {
            fs::write(tmp.path().join(name), "sk-stale\n").unwrap();
        }
        sync(
            OutputKind::KeyFile,
            &path,
            PRIVATE,
            Some(&material("sk-new", &m)),
        )
        .unwrap();
        let mut want: Vec<String> = kept.iter().map(|s| s.to_string()).collect();
        want.push("key".into());
        want.sort();
        assert_eq!(entries(tmp.path()), want);
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("elsewhere");
        fs::write(&target, "precious").unwrap();
        let path = tmp.path().join("key");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let m = models();
        sync(
            OutputKind::KeyFile,
            &path,
            PRIVATE,
            Some(&material("sk-s", &m)),
        )
        .unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "precious");
        assert!(fs::symlink_metadata(&path).unwrap().is_file());
    }
}
