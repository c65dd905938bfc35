//! Who may use the agent's socket: the allow-list checked against each peer's SO_PEERCRED, and
//! the passwd/group look-ups that turn configured names into ids.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::io;

/// Local users the agent serves. Root and the agent's own user are always allowed: both can
/// read the cache directly anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowList {
    own_uid: u32,
    uids: BTreeSet<u32>,
    gids: BTreeSet<u32>,
    /// Users listed as members of an allowed group (their supplementary groups are not in
    /// SO_PEERCRED, which carries only the effective gid).
    member_uids: BTreeSet<u32>,
}

impl AllowList {
    pub fn new(
        own_uid: u32,
        uids: BTreeSet<u32>,
        gids: BTreeSet<u32>,
        member_uids: BTreeSet<u32>,
    ) -> AllowList {
        AllowList {
            own_uid,
            uids,
            gids,
            member_uids,
        }
    }

    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        uid == 0
            || uid == self.own_uid
            || self.uids.contains(&uid)
            || self.member_uids.contains(&uid)
            || self.gids.contains(&gid)
    }
}

/// A group from the group database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub gid: u32,
    pub members: Vec<String>,
}

/// The uid of a user name, `None` when there is no such user.
// The user database goes through NSS (getpwnam_r), which only libc offers; rustix does not.
#[allow(unsafe_code)]
pub fn lookup_user(name: &str) -> io::Result<Option<u32>> {
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))?;
    let mut buf = vec![0 as libc::c_char; 1024];
    loop {
        // SAFETY: passwd is plain old data; getpwnam_r writes into it and into buf, whose length
        // we pass, and sets result to null or to &pwd.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some(pwd.pw_uid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            // Some NSS modules answer "not found" with these instead of a null result.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// A group's gid and member names, `None` when there is no such group.
// As lookup_user: getgrnam_r through NSS, only in libc.
#[allow(unsafe_code)]
pub fn lookup_group(name: &str) -> io::Result<Option<Group>> {
    let cname = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"))?;
    let mut buf = vec![0 as libc::c_char; 4096];
    loop {
        // SAFETY: as in lookup_user; gr_mem is a null-terminated array of C strings inside buf,
        // read before buf is touched again.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
                &mut grp,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => {
                let mut members = Vec::new();
                let mut p = grp.gr_mem;
                while !p.is_null() {
                    // SAFETY: p walks the null-terminated gr_mem array.
                    let member = unsafe { *p };
                    if member.is_null() {
                        break;
                    }
                    // SAFETY: each entry is a NUL-terminated string in buf.
                    members.push(
                        unsafe { CStr::from_ptr(member) }
                            .to_string_lossy()
                            .into_owned(),
                    );
                    p = unsafe { p.add(1) };
                }
                return Ok(Some(Group {
                    gid: grp.gr_gid,
                    members,
                }));
            }
            libc::ERANGE if buf.len() < 1 << 22 => buf.resize(buf.len() * 4, 0),
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_table() {
        let list = AllowList::new(
            500,
            BTreeSet::from([1000]),
            BTreeSet::from([2000]),
            BTreeSet::from([1500]),
        );
        let cases = [
            (0, 0, true, "root"),
            (500, 500, true, "the agent's own user"),
            (1000, 1000, true, "allow_uids / allow_users"),
            (1234, 2000, true, "primary group allowed"),
            (1500, 1500, true, "listed member of an allowed group"),
            (1234, 1234, false, "stranger"),
            (65534, 65534, false, "nobody"),
        ];
        for (uid, gid, want, why) in cases {
            assert_eq!(list.allows(uid, gid), want, "{why}");
        }
    }

    #[test]
    fn looks_up_root_and_misses_strangers() {
        assert_eq!(lookup_user("root").unwrap(), Some(0));
        assert_eq!(lookup_user("no-such-user-botcreds").unwrap(), None);
        assert_eq!(lookup_group("root").unwrap().map(|g| g.gid), Some(0));
        assert_eq!(lookup_group("no-such-group-botcreds").unwrap(), None);
        assert!(lookup_user("a\0b").is_err());
    }
}
