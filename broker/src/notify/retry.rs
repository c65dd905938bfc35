//! When to try a notification again: bounded attempts, exponential backoff with jitter, and
//! which answers are worth retrying at all.

use std::time::Duration;

/// How a failed delivery is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The backoff after the first failure; it doubles after each further one.
    pub initial: Duration,
    /// The longest backoff, and the longest `Retry-After` honoured.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The wait after `failed` attempts have failed (1 for the first failure), with "equal
    /// jitter": half of the exponential step is fixed and half is random (`jitter` in
    /// `[0, 1)`), so receivers that fail together are not hit again together, and a waiting
    /// time never collapses to zero.
    pub fn backoff(&self, failed: u32, jitter: f64) -> Duration {
        let exponent = failed.saturating_sub(1).min(30);
        let step = self.initial.saturating_mul(1u32 << exponent).min(self.max);
        let jitter = jitter.clamp(0.0, 1.0);
        step / 2 + step.mul_f64(jitter) / 2
    }

    /// The wait before the next attempt, honouring a receiver's `Retry-After` (capped at
    /// `max`) when it asks for longer than our own backoff.
    pub fn wait(&self, failed: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
        let own = self.backoff(failed, jitter);
        match retry_after {
            Some(asked) => own.max(asked.min(self.max)),
            None => own,
        }
    }

    /// Whether another attempt may follow `failed` failed ones.
    pub fn may_retry(&self, failed: u32) -> bool {
        failed < self.max_attempts
    }
}

/// What one attempt's answer means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// A failure that may pass: timeouts, 408, 429, 5xx, connection errors.
    Retry,
    /// The receiver refused the request itself (other 4xx, redirects): retrying changes nothing.
    Permanent,
}

/// Classify an HTTP status.
pub fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        408 | 425 | 429 | 500..=599 => Verdict::Retry,
        _ => Verdict::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
        }
    }

    #[test]
    fn backoff_doubles_within_jitter_bounds_and_is_capped() {
        let p = policy();
        // (failed attempts, step before jitter)
        for (failed, step) in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (40, 10)] {
            let step = Duration::from_secs(step);
            assert_eq!(p.backoff(failed, 0.0), step / 2, "failed={failed}");
            assert_eq!(p.backoff(failed, 1.0), step, "failed={failed}");
            let mid = p.backoff(failed, 0.5);
            assert!(mid > step / 2 && mid < step, "failed={failed}: {mid:?}");
        }
        // Out-of-range jitter is clamped, never a longer wait than the step.
        assert_eq!(p.backoff(1, 7.0), Duration::from_secs(1));
        assert_eq!(p.backoff(1, -1.0), Duration::from_millis(500));
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_cap() {
        let p = policy();
        assert_eq!(
            p.wait(1, 0.0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            p.wait(1, 0.0, Some(Duration::from_secs(3600))),
            Duration::from_secs(10)
        );
        // A shorter Retry-After does not shorten our own backoff.
        assert_eq!(
            p.wait(4, 1.0, Some(Duration::from_secs(1))),
            Duration::from_secs(8)
        );
    }

    #[test]
    fn attempts_are_bounded() {
        let p = policy();
        assert!(p.may_retry(1));
        assert!(p.may_retry(4));
        assert!(!p.may_retry(5));
        let once = RetryPolicy {
            max_attempts: 1,
            ..p
        };
        assert!(!once.may_retry(1));
    }

    #[test]
    fn verdicts() {
        for (status, want) in [
            (200, Verdict::Delivered),
            (204, Verdict::Delivered),
            (301, Verdict::Permanent),
            (400, Verdict::Permanent),
            (401, Verdict::Permanent),
            (404, Verdict::Permanent),
            (408, Verdict::Retry),
            (429, Verdict::Retry),
            (500, Verdict::Retry),
            (503, Verdict::Retry),
        ] {
            assert_eq!(verdict(status), want, "{status}");
        }
    }
}
