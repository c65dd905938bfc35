//! When to refresh, retry, expire or forget a credential: pure functions of the clock, so each
//! credential's task can sleep until exactly its next deadline (no polling), and the supervisor
//! that keeps those tasks alive.
//!
//! Every time here may come from the broker or the disk cache, both untrusted: the arithmetic is
//! checked (never an overflow panic), delays the broker asks for are clamped, and times are
//! range-checked against what a credential of the kind can be.

use std::future::Future;
use std::time::{Duration, SystemTime};

/// A credential with less than this left is treated as expired: never handed to git.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// First retry delay after a failed fetch; doubles per failure up to [`BACKOFF_CAP`].
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// While a request waits for a human, it is asked again every 10–20 s (with jitter).
pub const APPROVAL_POLL: Duration = Duration::from_secs(20);
/// A delay the broker asks for (`retry_after`) is honoured up to this: a broken or hostile
/// broker cannot park a credential's task for years (or overflow the clock with u64::MAX).
pub const MAX_SERVER_DELAY: Duration = Duration::from_secs(3600);
/// Clocks of the broker, GitHub and this host may disagree by this much: a credential may look
/// that much longer-lived than its kind allows, a cache record that much "from the future".
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// GitHub installation tokens live one hour.
pub const MAX_GITHUB_TOKEN_LIFE: Duration = crate::config::GITHUB_TOKEN_LIFETIME;
/// LiteLLM keys live at most as long as the broker lets a scope's keys live (its
/// `MAX_LIFETIME`, 366 days).
pub const MAX_LITELLM_KEY_LIFE: Duration = Duration::from_secs(366 * 86_400);
/// The latest time the agent ever plans for (9999-12-31T23:59:59Z): arithmetic past it
/// saturates here, and RFC 3339 can still write it.
const LATEST_UNIX: u64 = 253_402_300_799;
/// Restarts of a crashed task wait this long at first, doubling up to [`BACKOFF_CAP`].
pub const RESTART_BASE: Duration = Duration::from_secs(1);
/// Refreshes are spread by up to this much (or a tenth of `refresh_before`, if less), so that
/// many credentials fetched together do not all hit the broker in the same second later.
pub const MAX_REFRESH_JITTER: Duration = Duration::from_secs(60);

/// Whether a credential expiring at `expires_at` may still be handed out.
pub fn servable(expires_at: SystemTime, now: SystemTime) -> bool {
    expires_at
        .duration_since(now)
        .is_ok_and(|left| left >= EXPIRY_MARGIN)
}

/// Whether a credential expiring at `expires_at` has reached its expiry margin at `now`: from
/// that instant on a task drops it. The same instant the planners schedule `Expire` for, so a
/// task woken exactly then acts instead of planning the same step again (with a clock that
/// stands still, as in tests, that was an endless loop).
pub fn past_margin(expires_at: SystemTime, now: SystemTime) -> bool {
    expires_at
        .checked_sub(EXPIRY_MARGIN)
        .is_none_or(|margin| now >= margin)
}

/// The jitter for one fetched credential; `unit` is a uniform random number in `[0, 1)`.
pub fn refresh_jitter(refresh_before: Duration, unit: f64) -> Duration {
    MAX_REFRESH_JITTER
        .min(refresh_before / 10)
        .mul_f64(unit.clamp(0.0, 1.0))
}

/// When a credential expiring at `expires_at` is due for refresh.
pub fn refresh_at(
    expires_at: SystemTime,
    refresh_before: Duration,
    jitter: Duration,
) -> SystemTime {
    expires_at
        .checked_sub(refresh_before.saturating_add(jitter))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The latest time the agent plans for; see [`later`].
pub fn latest() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(LATEST_UNIX)
}

/// `t + d`, saturating at [`latest`] instead of panicking on overflow.
pub fn later(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d).map_or_else(latest, |x| x.min(latest()))
}

/// Delay before retry number `failures`: [`backoff`], or the `retry_after` the broker asked
/// for if longer, but never more than [`MAX_SERVER_DELAY`].
pub fn retry_delay(
    failures: u32,
    retry: Retry,
    retry_after: Option<Duration>,
    unit: f64,
) -> Duration {
    let own = backoff(failures, retry, unit);
    match retry_after {
        Some(after) => own.max(after.min(MAX_SERVER_DELAY)),
        None => own,
    }
}

/// Refuses a credential that would live longer than its kind can (`max_life`, plus
/// [`CLOCK_SKEW`]): a broken broker must not make a token look eternal.
pub fn check_lifetime(
    expires_at: SystemTime,
    now: SystemTime,
    max_life: Duration,
) -> Result<(), String> {
    if expires_at > later(now, max_life.saturating_add(CLOCK_SKEW)) {
        return Err(format!(
            "it expires longer than {} from now, more than this kind of credential can live",
            human(max_life)
        ));
    }
    Ok(())
}

/// The times of a cache record (Unix seconds) as times, if they are in range: fetched and used
/// not before the epoch nor after now (give or take [`CLOCK_SKEW`]), expiring within `max_life`
/// of the fetch. A record out of range is corrupt or forged and must be dropped.
pub fn record_times(
    expires_at: i64,
    fetched_at: i64,
    last_used: Option<i64>,
    max_life: Duration,
    now: SystemTime,
) -> Result<(SystemTime, SystemTime, Option<SystemTime>), String> {
    let newest = later(now, CLOCK_SKEW);
    let past = |name: &str, secs: i64| -> Result<SystemTime, String> {
        let t = u64::try_from(secs)
            .ok()
            .and_then(|s| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s)))
            .filter(|t| *t <= newest)
            .ok_or_else(|| format!("{name} {secs} is before the epoch or in the future"))?;
        Ok(t)
    };
    let fetched = past("fetched_at", fetched_at)?;
    let used = last_used.map(|u| past("last_used", u)).transpose()?;
    let expires = u64::try_from(expires_at)
        .ok()
        .and_then(|s| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .filter(|e| *e <= later(fetched, max_life.saturating_add(CLOCK_SKEW)))
        .ok_or_else(|| {
            format!(
                "expires_at {expires_at} is before the epoch or more than {} after the fetch",
                human(max_life)
            )
        })?;
    Ok((expires, fetched, used))
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(86_400) {
        format!("{} days", s / 86_400)
    } else if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}

/// Delay before restarting a task that crashed `panics` times: [`RESTART_BASE`], doubling, at
/// most [`BACKOFF_CAP`].
pub fn restart_delay(panics: u32) -> Duration {
    RESTART_BASE
        .saturating_mul(1 << panics.saturating_sub(1).min(16))
        .min(BACKOFF_CAP)
}

/// Runs the task `make` builds, and builds and runs it again whenever it panics, after a
/// growing delay; returns when a run ends normally. A bug (or an input nobody foresaw) must
/// never silently stop a credential from being refreshed. The first panic is logged as an
/// error, repeats as warnings at the 2nd, 4th, 8th, ... panic (not a log line per crash).
/// Dropping (aborting) the supervisor aborts
/// the running task too.
pub async fn supervise<F, Fut>(what: String, mut make: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    /// Aborts the supervised task when the supervisor goes away.
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut panics: u32 = 0;
    loop {
        let task = tokio::spawn(make());
        let _guard = AbortOnDrop(task.abort_handle());
        match task.await {
            Ok(()) => return,
            Err(e) if e.is_cancelled() => return,
            Err(e) => {
                panics = panics.saturating_add(1);
                let delay = restart_delay(panics);
                if panics == 1 {
                    tracing::error!(task = %what, error = %e, "a credential task crashed; restarting it (a bug: please report it)");
                } else if panics.is_power_of_two() {
                    // Not once per crash: a task crashing at every start would flood the log.
                    tracing::warn!(task = %what, panics, restart_in_s = delay.as_secs(), "a credential task keeps crashing; restarting it");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// How soon to try again after a failed fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The broker or its upstream is unreachable or overloaded: back off exponentially.
    Soon,
    /// The broker answered with a refusal that will not change by itself soon (policy,
    /// configuration): wait the longest delay.
    Later,
    /// A human has yet to decide: ask again at a steady pace, so the credential arrives soon
    /// after the approval (the broker joins identical pending requests into one).
    Steady,
}

/// Delay before retry number `failures` (1 for the first failure), with "equal jitter": half
/// the exponential delay fixed, half random, so retries spread out but never bunch at zero.
pub fn backoff(failures: u32, retry: Retry, unit: f64) -> Duration {
    let full = match retry {
        Retry::Later => BACKOFF_CAP,
        Retry::Steady => APPROVAL_POLL,
        Retry::Soon => {
            let doublings = failures.saturating_sub(1).min(16);
            BACKOFF_BASE.saturating_mul(1 << doublings).min(BACKOFF_CAP)
        }
    };
    full / 2 + (full / 2).mul_f64(unit.clamp(0.0, 1.0))
}

/// What a credential's task knows when it plans its next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeline {
    /// Expiry of the credential held, if any.
    pub expires_at: Option<SystemTime>,
    /// When the held credential is due for refresh.
    pub refresh_at: Option<SystemTime>,
    /// Set after a failed fetch: no fetch before this.
    pub retry_at: Option<SystemTime>,
    /// Configured credentials are kept fresh (and fetched when missing) always; per-repository
    /// ones only while git uses them.
    pub always_fresh: bool,
    pub last_used: Option<SystemTime>,
}

/// The next step of a credential's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Drop the held credential: it is about to expire and no refresh replaced it.
    Expire,
    /// Ask the broker for a fresh credential.
    Fetch,
    /// Forget this (per-repository) credential entirely: unused and empty.
    Forget,
}

/// The next action and when it is due; `None` means nothing is due until something changes
/// (git asks, or an erase).
pub fn next_action(
    now: SystemTime,
    t: &Timeline,
    idle_timeout: Duration,
) -> Option<(SystemTime, Action)> {
    let in_use = t
        .last_used
        .is_some_and(|used| later(used, idle_timeout) > now);
    let keep_fresh = t.always_fresh || in_use;
    let fetch = if keep_fresh {
        let due = match (t.expires_at, t.refresh_at) {
            (Some(_), Some(refresh)) => Some(refresh),
            (Some(expires), None) => Some(expires),
            // Per-repository credentials are fetched when git asks, not ahead of it.
            (None, _) if t.always_fresh => Some(now),
            (None, _) => None,
        };
        due.map(|d| t.retry_at.map_or(d, |r| r.max(d)))
    } else {
        None
    };
    let expire = t.expires_at.map(|e| {
        e.checked_sub(EXPIRY_MARGIN)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    });
    let forget = match (t.always_fresh, t.expires_at) {
        (false, None) => Some(t.last_used.map_or(now, |used| later(used, idle_timeout))),
        _ => None,
    };
    // Earliest first; at equal times expire before fetching (a fetch may fail), and fetching
    // or expiring before forgetting.
    [
        (expire, Action::Expire),
        (fetch, Action::Fetch),
        (forget, Action::Forget),
    ]
    .into_iter()
    .filter_map(|(at, action)| at.map(|at| (at, action)))
    .min_by_key(|(at, action)| (*at, *action as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn t(mins: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + MIN * mins as u32
    }

    #[test]
    fn servable_means_at_least_a_minute_left() {
        let now = t(0);
        assert!(servable(now + Duration::from_secs(61), now));
        assert!(servable(now + Duration::from_secs(60), now));
        assert!(!servable(now + Duration::from_secs(59), now));
        assert!(!servable(now, now));
        assert!(!servable(t(0) - MIN, now), "already expired");
    }

    /// The expiry the planner schedules is the instant a task drops the credential.
    #[test]
    fn the_planned_expiry_is_past_the_margin() {
        let timeline = Timeline {
            expires_at: Some(t(60)),
            refresh_at: Some(t(20)),
            retry_at: Some(t(70)),
            always_fresh: true,
            last_used: None,
        };
        let (at, action) = next_action(t(59), &timeline, 60 * MIN).unwrap();
        assert_eq!(action, Action::Expire);
        assert!(past_margin(t(60), at), "due at {at:?} but kept");
        assert!(!past_margin(t(60), at - Duration::from_nanos(1)));
        assert!(past_margin(SystemTime::UNIX_EPOCH, t(0)));
    }

    #[test]
    fn refresh_timing() {
        let forty = 40 * MIN;
        assert_eq!(refresh_at(t(60), forty, Duration::ZERO), t(20));
        assert_eq!(
            refresh_at(t(60), forty, Duration::from_secs(30)),
            t(20) - Duration::from_secs(30)
        );
        assert_eq!(refresh_jitter(forty, 0.0), Duration::ZERO);
        assert_eq!(refresh_jitter(forty, 0.5), Duration::from_secs(30));
        assert_eq!(
            refresh_jitter(Duration::from_secs(100), 1.0),
            Duration::from_secs(10),
            "a tenth"
        );
        assert_eq!(refresh_jitter(forty, 7.0), MAX_REFRESH_JITTER, "clamped");
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let cases = [
            (1, Retry::Soon, 0.0, 2500),
            (1, Retry::Soon, 1.0, 5000),
            (2, Retry::Soon, 0.0, 5000),
            (3, Retry::Soon, 0.5, 15000),
            (7, Retry::Soon, 1.0, 300_000),
            (50, Retry::Soon, 0.0, 150_000),
            (u32::MAX, Retry::Soon, 1.0, 300_000),
            (1, Retry::Later, 0.0, 150_000),
            (9, Retry::Steady, 0.0, 10_000),
            (1, Retry::Steady, 1.0, 20_000),
        ];
        for (failures, retry, unit, want_ms) in cases {
            assert_eq!(
                backoff(failures, retry, unit).as_millis(),
                want_ms,
                "{failures} {retry:?} {unit}"
            );
        }
    }

    #[test]
    fn plans_the_next_step() {
        let idle = 24 * 60 * MIN;
        let held = Timeline {
            expires_at: Some(t(60)),
            refresh_at: Some(t(20)),
            retry_at: None,
            always_fresh: true,
            last_used: None,
        };
        let path = Timeline {
            always_fresh: false,
            last_used: Some(t(0)),
            ..held
        };
        type Case = (
            &'static str,
            SystemTime,
            Timeline,
            Option<(SystemTime, Action)>,
        );
        let cases: Vec<Case> = vec![
            (
                "configured, fresh: refresh when due",
                t(0),
                held,
                Some((t(20), Action::Fetch)),
            ),
            (
                "configured, overdue: refresh now (returns a past time)",
                t(30),
                held,
                Some((t(20), Action::Fetch)),
            ),
            (
                "configured, failing: retry after backoff",
                t(30),
                Timeline {
                    retry_at: Some(t(31)),
                    ..held
                },
                Some((t(31), Action::Fetch)),
            ),
            (
                "backoff beyond expiry: expire first",
                t(58),
                Timeline {
                    retry_at: Some(t(62)),
                    ..held
                },
                Some((t(59), Action::Expire)),
            ),
            (
                "configured, nothing held: fetch now",
                t(5),
                Timeline {
                    expires_at: None,
                    refresh_at: None,
                    ..held
                },
                Some((t(5), Action::Fetch)),
            ),
            (
                "configured, nothing held, failing: fetch after backoff",
                t(5),
                Timeline {
                    expires_at: None,
                    refresh_at: None,
                    retry_at: Some(t(10)),
                    ..held
                },
                Some((t(10), Action::Fetch)),
            ),
            (
                "per-repository in use: refresh when due",
                t(1),
                path,
                Some((t(20), Action::Fetch)),
            ),
            (
                "per-repository idle: no refresh, expire at the margin",
                t(30),
                Timeline {
                    last_used: Some(t(30) - idle),
                    ..path
                },
                Some((t(59), Action::Expire)),
            ),
            (
                "per-repository empty and in use: forget once idle",
                t(1),
                Timeline {
                    expires_at: None,
                    refresh_at: None,
                    ..path
                },
                Some((t(0) + idle, Action::Forget)),
            ),
            (
                "per-repository empty, never used: forget now",
                t(1),
                Timeline {
                    expires_at: None,
                    refresh_at: None,
                    last_used: None,
                    ..path
                },
                Some((t(1), Action::Forget)),
            ),
        ];
        for (name, now, timeline, want) in cases {
            assert_eq!(next_action(now, &timeline, idle), want, "{name}");
        }
    }

    /// The latest time a cache record can claim (i64::MAX Unix seconds, as a corrupt or
    /// hostile record may hold).
    fn extreme() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(i64::MAX as u64)
    }

    #[test]
    fn extreme_times_never_panic_the_planner() {
        let idle = 24 * 60 * MIN;
        let cases = [
            (
                "last_used at the end of time",
                None,
                None,
                None,
                Some(extreme()),
            ),
            (
                "expires at the end of time",
                Some(extreme()),
                Some(extreme()),
                None,
                None,
            ),
            (
                "retry at the end of time",
                Some(t(60)),
                Some(t(20)),
                Some(extreme()),
                Some(t(0)),
            ),
            (
                "everything at the epoch",
                Some(SystemTime::UNIX_EPOCH),
                Some(SystemTime::UNIX_EPOCH),
                Some(SystemTime::UNIX_EPOCH),
                Some(SystemTime::UNIX_EPOCH),
            ),
        ];
        for (name, expires_at, refresh_at, retry_at, last_used) in cases {
            for always_fresh in [true, false] {
                let timeline = Timeline {
                    expires_at,
                    refresh_at,
                    retry_at,
                    always_fresh,
                    last_used,
                };
                let got = std::panic::catch_unwind(|| next_action(t(0), &timeline, idle));
                assert!(got.is_ok(), "{name}, always_fresh {always_fresh}: panicked");
            }
        }
    }

    #[test]
    fn server_delays_are_clamped() {
        let cases = [
            (None, 1, Duration::from_millis(2500)),
            (Some(Duration::from_secs(30)), 1, Duration::from_secs(30)),
            (Some(Duration::from_secs(1)), 1, Duration::from_millis(2500)),
            (Some(Duration::from_secs(u64::MAX)), 1, MAX_SERVER_DELAY),
            (Some(Duration::MAX), 1, MAX_SERVER_DELAY),
            (Some(Duration::from_secs(7200)), 1, MAX_SERVER_DELAY),
        ];
        for (after, failures, want) in cases {
            assert_eq!(
                retry_delay(failures, Retry::Soon, after, 0.0),
                want,
                "{after:?}"
            );
        }
        assert_eq!(later(t(0), Duration::MAX), latest());
        assert_eq!(later(extreme(), MIN), latest());
        assert_eq!(later(t(0), MIN), t(1));
        assert_eq!(restart_delay(1), RESTART_BASE);
        assert_eq!(restart_delay(3), 4 * RESTART_BASE);
        assert_eq!(restart_delay(u32::MAX), BACKOFF_CAP);
    }

    #[test]
    fn lifetimes_beyond_the_kind_are_refused() {
        let hour = MAX_GITHUB_TOKEN_LIFE;
        let cases = [
            ("an hour", t(60), true),
            ("an hour and the skew", t(65), true),
            ("two hours", t(120), false),
            ("the end of time", extreme(), false),
            ("the year 9999", latest(), false),
        ];
        for (name, expires, ok) in cases {
            assert_eq!(check_lifetime(expires, t(0), hour).is_ok(), ok, "{name}");
        }
    }

    #[test]
    fn cache_record_times_are_range_checked() {
        let now = t(0);
        let n = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let hour = MAX_GITHUB_TOKEN_LIFE;
        let cases: Vec<(&str, i64, i64, Option<i64>, bool)> = vec![
            ("plain", n + 1800, n - 60, Some(n), true),
            ("never used", n + 1800, n - 60, None, true),
            (
                "already expired (dropped elsewhere)",
                n - 60,
                n - 3600,
                None,
                true,
            ),
            (
                "used at the end of time",
                n + 1800,
                n,
                Some(i64::MAX),
                false,
            ),
            ("used before the epoch", n + 1800, n, Some(-1), false),
            (
                "fetched at the end of time",
                n + 1800,
                i64::MAX,
                None,
                false,
            ),
            ("fetched before the epoch", n + 1800, i64::MIN, None, false),
            ("fetched a day from now", n + 1800, n + 86_400, None, false),
            ("expires at the end of time", i64::MAX, n, None, false),
            ("expires before the epoch", -5, n, None, false),
            ("lives three hours", n + 3 * 3600, n, None, false),
        ];
        for (name, expires, fetched, used, ok) in cases {
            let got = record_times(expires, fetched, used, hour, now);
            assert_eq!(got.is_ok(), ok, "{name}: {got:?}");
        }
    }

    /// A task that panics is started again (after a delay) until it ends normally; aborting
    /// the supervisor aborts the task it runs.
    #[tokio::test]
    async fn supervisor_restarts_a_crashed_task() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        supervise("test".into(), move || {
            let runs = counted.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("first run crashes");
                }
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "restarted once, then done");

        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let mut started_tx = Some(started_tx);
        let mut tx = Some(tx);
        let supervisor = tokio::spawn(supervise("forever".into(), move || {
            // The task holds `tx` until it is aborted; its drop closes `rx`.
            let tx = tx.take();
            let started = started_tx.take();
            async move {
                let _held = tx;
                if let Some(s) = started {
                    let _ = s.send(());
                }
                std::future::pending::<()>().await;
            }
        }));
        started_rx.await.unwrap();
        supervisor.abort();
        assert!(
            rx.await.is_err(),
            "the supervised task was dropped with its supervisor"
        );
    }
}
