//! Replacing a file in one step, for the cache and the key files: a reader sees the old file
//! or the new one, never a partial one, and the new one is on disk before anyone sees it.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags};
use std::sync::atomic::{AtomicU64, Ordering};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temp-file name unique in this process: `{prefix}{pid}-{counter}`.
pub fn temp_name(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes `content` to `dir/temp` (created new, never through a symlink, with `mode` whatever
/// the umask; `prepare` runs on the open file first, e.g. to set its group), fsyncs it, renames
/// it over `target` and fsyncs `dir`. On failure the temp file is removed.
pub fn replace(
    dir: &Path,
    temp: &str,
    target: &Path,
    mode: u32,
    content: &[u8],
    prepare: impl FnOnce(&File) -> io::Result<()>,
) -> io::Result<()> {
    let temp = dir.join(temp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)?;
        prepare(&f)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
        fs::rename(&temp, target)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// [`replace`] inside the directory `dir` (an open descriptor, so that nothing on the way to it
/// can be swapped meanwhile): `dir/temp` is created new (never through a symlink), gets `mode`
/// and `prepare`, is written and fsynced, renamed over `dir/target`, and `dir` is fsynced. On
/// failure the temp file is removed.
pub fn replace_at(
    dir: impl AsFd,
    temp: &str,
    target: &OsStr,
    mode: u32,
    content: &[u8],
    prepare: impl FnOnce(&File) -> io::Result<()>,
) -> io::Result<()> {
    let dir = dir.as_fd();
    let fd = rustix::fs::openat(
        dir,
        temp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode & 0o7777),
    )?;
    let result = (|| {
        let mut f = File::from(fd);
        prepare(&f)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(content)?;
        f.sync_all()?;
        rustix::fs::renameat(dir, temp, dir, target)?;
        rustix::fs::fsync(dir)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(dir, temp, AtFlags::empty());
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_with_the_mode_asked_for_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("key");
        std::fs::write(&target, "old\n").unwrap();
        replace(
            dir.path(),
            &temp_name(".key.tmp-"),
            &target,
            0o640,
            b"new\n",
            |_| Ok(()),
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new\n");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["key"]);

        // A failing step leaves the old file and no temp file.
        let err = replace(
            dir.path(),
            &temp_name(".key.tmp-"),
            &target,
            0o600,
            b"x",
            |_| Err(io::Error::other("no")),
        );
        assert!(err.is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
