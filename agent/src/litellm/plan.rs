//! When a key is refreshed and what an entry's task does next: pure functions of the clock.

use std::time::{Duration, SystemTime};

use crate::litellm_config::LitellmEntry;
use crate::refresh::{self, EXPIRY_MARGIN};

/// Without `refresh_before`, the refresh window is a share of the lifetime, but at most this:
/// a 30-day key is refreshed a day ahead, not a week.
pub const MAX_DEFAULT_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// The refresh window is never shorter than this, so a refresh comes before the key is
/// dropped at its expiry margin.
pub const MIN_WINDOW: Duration = Duration::from_secs(2 * 60);

/// How long before expiry a key of `lifetime` is refreshed: `refresh_before` if set, else
/// `fraction` of the lifetime (at most a day); never more than half the lifetime, never less
/// than [`MIN_WINDOW`].
pub fn refresh_window(lifetime: Duration, fraction: f64, before: Option<Duration>) -> Duration {
    let wanted = match before {
        Some(b) => b,
        None => lifetime.mul_f64(fraction).min(MAX_DEFAULT_WINDOW),
    };
    wanted.min(lifetime / 2).max(MIN_WINDOW)
}

/// When a key fetched at `fetched_at` and expiring at `expires_at` is due for refresh;
/// `unit` in `[0, 1)` spreads refreshes of many agents (see [`refresh::refresh_jitter`]).
pub fn refresh_at(
    entry: &LitellmEntry,
    fetched_at: SystemTime,
    expires_at: SystemTime,
    unit: f64,
) -> SystemTime {
    let lifetime = expires_at.duration_since(fetched_at).unwrap_or_default();
    let window = refresh_window(lifetime, entry.refresh_fraction, entry.refresh_before);
    refresh::refresh_at(expires_at, window, refresh::refresh_jitter(window, unit))
}

/// What an entry's task knows when it plans its next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub expires_at: Option<SystemTime>,
    pub refresh_at: Option<SystemTime>,
    /// Next regular check with the broker (revocation, rotation).
    pub next_check: Option<SystemTime>,
    /// After a failure: nothing is asked of the broker before this.
    pub retry_at: Option<SystemTime>,
}

/// The next step of an entry's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// The key is about to expire and nothing replaced it: remove it from the files.
    Expire,
    /// Nothing held: ask for a key.
    Fetch,
    /// The key is due for refresh: ask for a new one.
    Refresh,
    /// Ask the broker which key is current (a revoked or rotated key comes back different).
    Check,
}

/// The next step and when it is due (a time in the past means now).
pub fn next_step(now: SystemTime, p: &Plan) -> (SystemTime, Step) {
    let Some(expires_at) = p.expires_at else {
        return (p.retry_at.unwrap_or(now), Step::Fetch);
    };
    let expire = expires_at
        .checked_sub(EXPIRY_MARGIN)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let later = |t: SystemTime| p.retry_at.map_or(t, |r| r.max(t));
    let first = match (p.refresh_at, p.next_check) {
        (Some(r), Some(c)) => Some(r.min(c)),
        (r, c) => r.or(c),
    };
    // Whatever the reason to ask, it is a refresh once the refresh time has come.
    let ask = first.map(later).map(|at| {
        if p.refresh_at.is_some_and(|r| r <= at) {
            (at, Step::Refresh)
        } else {
            (at, Step::Check)
        }
    });
    match ask {
        Some(a) if a.0 < expire => a,
        _ => (expire, Step::Expire),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86_400);

    fn t(mins: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000) + MIN * mins as u32
    }

    #[test]
    fn refresh_windows_suit_lifetimes_from_an_hour_to_a_month() {
        let f = 0.25;
        let cases = [
            ("1h ci key", HOUR, None, 15 * MIN),
            ("2h agent key", 2 * HOUR, None, 30 * MIN),
            ("12h workspace key", 12 * HOUR, None, 3 * HOUR),
            ("30d user key: a day ahead at most", 30 * DAY, None, DAY),
            ("refresh_before wins", 12 * HOUR, Some(HOUR), HOUR),
            (
                "refresh_before capped at half",
                HOUR,
                Some(2 * HOUR),
                30 * MIN,
            ),
            ("never under the minimum", 4 * MIN, None, MIN_WINDOW),
            ("tiny keys: the minimum", MIN, None, MIN_WINDOW),
        ];
        for (name, lifetime, before, want) in cases {
            assert_eq!(refresh_window(lifetime, f, before), want, "{name}");
        }
        assert_eq!(refresh_window(HOUR, 0.5, None), 30 * MIN);
    }

    #[test]
    fn plans_the_next_step() {
        let held = Plan {
            expires_at: Some(t(60)),
            refresh_at: Some(t(45)),
            next_check: Some(t(5)),
            retry_at: None,
        };
        let cases: Vec<(&str, SystemTime, Plan, (SystemTime, Step))> = vec![
            (
                "nothing held: fetch now",
                t(0),
                Plan {
                    expires_at: None,
                    refresh_at: None,
                    next_check: None,
                    retry_at: None,
                },
                (t(0), Step::Fetch),
            ),
            (
                "nothing held, failing: fetch after backoff",
                t(0),
                Plan {
                    expires_at: None,
                    refresh_at: None,
                    next_check: None,
                    retry_at: Some(t(2)),
                },
                (t(2), Step::Fetch),
            ),
            ("held: check first", t(0), held, (t(5), Step::Check)),
            (
                "check due after the refresh time: refresh",
                t(44),
                Plan {
                    next_check: Some(t(50)),
                    ..held
                },
                (t(45), Step::Refresh),
            ),
            (
                "failing: the check waits for the backoff",
                t(6),
                Plan {
                    retry_at: Some(t(8)),
                    ..held
                },
                (t(8), Step::Check),
            ),
            (
                "backoff past the refresh time: refresh then",
                t(44),
                Plan {
                    next_check: Some(t(40)),
                    retry_at: Some(t(46)),
                    ..held
                },
                (t(46), Step::Refresh),
            ),
            (
                "backoff beyond expiry: expire first",
                t(58),
                Plan {
                    retry_at: Some(t(62)),
                    ..held
                },
                (t(59), Step::Expire),
            ),
        ];
        for (name, now, plan, want) in cases {
            assert_eq!(next_step(now, &plan), want, "{name}");
        }
    }
}
