//! The agent's clock, injected so that refresh, retry and expiry can be tested in-process
//! without waiting on wall-clock minutes: every credential task reads the time and sleeps
//! through a [`Clock`].

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

/// A future the clock hands out; boxed so that `dyn Clock` works.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Wall-clock time and sleeping until a wall-clock time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
    /// Resolves once [`Clock::now`] has reached `at` (at once if it has already).
    fn sleep_until(&self, at: SystemTime) -> Sleep;
}

/// The system's clock: what the agent runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep_until(&self, at: SystemTime) -> Sleep {
        // Re-read on every wake-up by the callers: a wall clock set forward or back only moves
        // the deadline, it never loses it.
        let delay = at.duration_since(SystemTime::now()).unwrap_or_default();
        Box::pin(tokio::time::sleep(delay))
    }
}

/// A wall clock that follows tokio's clock from a fixed start: under `tokio::time::pause` it
/// stands still until the runtime is idle and then jumps to the next timer, so a test can run
/// hours of refreshes in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: SystemTime,
    origin: tokio::time::Instant,
}

impl TokioClock {
    /// A clock reading `start` now. Call it inside the runtime (after pausing time, if paused).
    pub fn starting_at(start: SystemTime) -> TokioClock {
        TokioClock {
            start,
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        crate::refresh::later(self.start, self.origin.elapsed())
    }

    fn sleep_until(&self, at: SystemTime) -> Sleep {
        // Bounded so that the instant arithmetic cannot overflow (a plan may say 9999).
        const FAR: std::time::Duration = std::time::Duration::from_secs(30 * 365 * 86_400);
        let after = at.duration_since(self.start).unwrap_or_default().min(FAR);
        Box::pin(tokio::time::sleep_until(self.origin + after))
    }
}
