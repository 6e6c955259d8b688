//! A persistent VM's lifetime limits (`--idle-timeout-ms`,
//! `--max-duration-ms`): deadlines the session's `select!` waits on, like
//! every other. Idle is "no client attached and no exec running"; the idle
//! clock starts when the session last became idle, which it can only do on
//! a wake-up, so checking before each wait sees every change.

use std::fmt;
use std::time::Duration;

use capsem_host::resources::format_duration_ms;
use tokio::time::Instant;

/// Which limit ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Idle(Duration),
    Max(Duration),
}

impl fmt::Display for Limit {
    /// As `status.json`'s `stop_reason` and `capsem list` show it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms =
            |d: &Duration| format_duration_ms(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        match self {
            Limit::Idle(d) => write!(f, "idle timeout {}", ms(d)),
            Limit::Max(d) => write!(f, "max duration {}", ms(d)),
        }
    }
}

/// The limits and the idle clock.
#[derive(Debug)]
pub struct Lifetime {
    idle: Option<Duration>,
    max: Option<(Duration, Instant)>,
    /// Since when nothing has been attached or running.
    idle_since: Option<Instant>,
}

impl Lifetime {
    /// Limits counted from `start`.
    pub fn new(idle: Option<Duration>, max: Option<Duration>, start: Instant) -> Self {
        Self {
            idle,
            max: max.map(|d| (d, start + d)),
            idle_since: None,
        }
    }

    /// The next deadline and the limit it enforces, given whether the VM is
    /// `busy` now; an idle clock starts at `now` when it was not running.
    pub fn next(&mut self, busy: bool, now: Instant) -> Option<(Instant, Limit)> {
        self.idle_since = match (busy, self.idle_since) {
            (true, _) => None,
            (false, None) => Some(now),
            (false, since) => since,
        };
        let idle = self
            .idle
            .zip(self.idle_since)
            .map(|(d, since)| (since + d, Limit::Idle(d)));
        let max = self.max.map(|(d, at)| (at, Limit::Max(d)));
        match (idle, max) {
            (Some(i), Some(m)) => Some(if m.0 <= i.0 { m } else { i }),
            (i, m) => i.or(m),
        }
    }
}

/// Resolves with the limit at its deadline; pending without one.
pub async fn reached(next: Option<(Instant, Limit)>) -> Limit {
    match next {
        Some((at, limit)) => {
            tokio::time::sleep_until(at).await;
            limit
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn no_limits_no_deadline() {
        let now = Instant::now();
        assert_eq!(Lifetime::new(None, None, now).next(false, now), None);
    }

    #[test]
    fn the_idle_clock_starts_when_idle_and_stops_while_busy() {
        let t0 = Instant::now();
        let mut l = Lifetime::new(Some(5 * S), None, t0);
        assert_eq!(l.next(false, t0), Some((t0 + 5 * S, Limit::Idle(5 * S))));
        // Still idle later: the same deadline, not a moving one.
        assert_eq!(
            l.next(false, t0 + 3 * S),
            Some((t0 + 5 * S, Limit::Idle(5 * S)))
        );
        // Busy (a client attached): no idle deadline at all.
        assert_eq!(l.next(true, t0 + 4 * S), None);
        // Idle again: counted from then.
        assert_eq!(
            l.next(false, t0 + 9 * S),
            Some((t0 + 14 * S, Limit::Idle(5 * S)))
        );
    }

    #[test]
    fn max_duration_holds_even_while_busy_and_the_earlier_wins() {
        let t0 = Instant::now();
        let mut l = Lifetime::new(Some(5 * S), Some(7 * S), t0);
        assert_eq!(l.next(true, t0 + S), Some((t0 + 7 * S, Limit::Max(7 * S))));
        assert_eq!(
            l.next(false, t0 + S),
            Some((t0 + 6 * S, Limit::Idle(5 * S)))
        );
        assert_eq!(
            l.next(false, t0 + 4 * S),
            Some((t0 + 6 * S, Limit::Idle(5 * S)))
        );
        let mut l = Lifetime::new(Some(5 * S), Some(3 * S), t0);
        assert_eq!(l.next(false, t0), Some((t0 + 3 * S, Limit::Max(3 * S))));
    }

    #[test]
    fn reasons_read_as_the_user_wrote_them() {
        assert_eq!(Limit::Idle(5 * S).to_string(), "idle timeout 5s");
        assert_eq!(Limit::Max(7200 * S).to_string(), "max duration 2h");
    }
}
