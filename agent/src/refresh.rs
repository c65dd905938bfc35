//! When to refresh, retry, expire or forget a credential: pure functions of the clock, so each
//! credential's task can sleep until exactly its next deadline (no polling).

use std::time::{Duration, SystemTime};

/// A credential with less than this left is treated as expired: never handed to git.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// First retry delay after a failed fetch; doubles per failure up to [`BACKOFF_CAP`].
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
pub const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// While a request waits for a human, it is asked again every 10–20 s (with jitter).
pub const APPROVAL_POLL: Duration = Duration::from_secs(20);
/// Refreshes are spread by up to this much (or a tenth of `refresh_before`, if less), so that
/// many credentials fetched together do not all hit the broker in the same second later.
pub const MAX_REFRESH_JITTER: Duration = Duration::from_secs(60);

/// Whether a credential expiring at `expires_at` may still be handed out.
pub fn servable(expires_at: SystemTime, now: SystemTime) -> bool {
    expires_at
        .duration_since(now)
        .is_ok_and(|left| left >= EXPIRY_MARGIN)
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
        .checked_sub(refresh_before + jitter)
        .unwrap_or(SystemTime::UNIX_EPOCH)
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
    let in_use = t.last_used.is_some_and(|used| used + idle_timeout > now);
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
        (false, None) => Some(t.last_used.map_or(now, |used| used + idle_timeout)),
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
}
