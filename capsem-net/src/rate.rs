//! Bounds on a flood of the guest's questions, pure like the rest of the
//! crate (the caller passes the time; nothing here reads a clock):
//!
//! * [`Bucket`]: a token bucket, `burst` questions at once and then
//!   `per_sec` a second; a question over it is refused at once, never
//!   queued;
//! * [`Summary`]: a count of events reported at most once per interval, so
//!   a flood is one log line with its count instead of a line per event
//!   (the first event of a quiet spell is reported at once);
//! * [`Failures`]: a [`Summary`] of failures that keeps the last one's
//!   reason for its report.
//!
//! The guest's resolver (capsem-agent) and capsem-process each run their
//! own: the agent's keep an honest guest's flood off the host, the host's
//! hold against a guest that bypasses the agent.

use std::time::{Duration, Instant};

/// A token bucket. Time going backwards adds nothing.
#[derive(Debug, Clone)]
pub struct Bucket {
    per_sec: u32,
    burst: u32,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Full at `now`: `burst` (at least 1) questions at once, then
    /// `per_sec` a second.
    pub fn new(per_sec: u32, burst: u32, now: Instant) -> Self {
        let burst = burst.max(1);
        Self {
            per_sec,
            burst,
            tokens: f64::from(burst),
            last: now,
        }
    }

    /// Takes one token: whether the question may go on.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        if now > self.last {
            self.last = now;
        }
        self.tokens = (self.tokens + elapsed * f64::from(self.per_sec)).min(f64::from(self.burst));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The sustained rate.
    pub fn per_sec(&self) -> u32 {
        self.per_sec
    }
}

/// Events counted between reports, at most one report per interval.
#[derive(Debug, Clone)]
pub struct Summary {
    every: Duration,
    last: Option<Instant>,
    count: u64,
}

impl Summary {
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            count: 0,
        }
    }

    /// Counts `n` more events.
    pub fn add(&mut self, n: u64) {
        self.count = self.count.saturating_add(n);
    }

    /// The events to report now, if a report is due: some are counted and
    /// the last report is at least one interval old (or there was none).
    pub fn due(&mut self, now: Instant) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }

    /// When the counted events will be due (`now` if they are);
    /// `None` when none are counted.
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        if self.count == 0 {
            return None;
        }
        Some(self.last.map_or(now, |l| (l + self.every).max(now)))
    }

    /// The interval.
    pub fn every(&self) -> Duration {
        self.every
    }
}

/// Failures counted like a [`Summary`]; a report carries the last one's
/// reason.
#[derive(Debug, Clone)]
pub struct Failures {
    summary: Summary,
    last: Option<String>,
}

impl Failures {
    pub fn new(every: Duration) -> Self {
        Self {
            summary: Summary::new(every),
            last: None,
        }
    }

    /// Counts one more failure, and why.
    pub fn add(&mut self, why: String) {
        self.summary.add(1);
        self.last = Some(why);
    }

    /// How many failed since the last report, and the last reason, if a
    /// report is due ([`Summary::due`]).
    pub fn due(&mut self, now: Instant) -> Option<(u64, String)> {
        let n = self.summary.due(now)?;
        Some((n, self.last.take().unwrap_or_default()))
    }

    /// [`Summary::deadline`].
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        self.summary.deadline(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, 5, t0);
        assert_eq!((0..10).filter(|_| b.take(t0)).count(), 5);
        // 10 ms at 100/s is one more token.
        assert!(b.take(t0 + 10 * MS));
        assert!(!b.take(t0 + 10 * MS));
        // A long pause fills it to the burst, no further.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 5);
        // The clock going back neither adds nor panics.
        assert!(!b.take(t0));
        assert_eq!(b.per_sec(), 100);
    }

    #[test]
    fn a_bucket_over_a_second_of_flood_lets_through_burst_plus_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(200, 200, t0);
        // 100,000 questions spread over one second.
        let passed = (0..100_000u32)
            .filter(|i| b.take(t0 + Duration::from_micros(u64::from(*i) * 10)))
            .count();
        assert!((399..=401).contains(&passed), "{passed}");
    }

    #[test]
    fn a_summary_reports_at_once_then_once_per_interval() {
        let t0 = Instant::now();
        let mut s = Summary::new(Duration::from_secs(5));
        assert_eq!(s.due(t0), None);
        assert_eq!(s.deadline(t0), None);
        s.add(1);
        assert_eq!(s.deadline(t0), Some(t0));
        assert_eq!(s.due(t0), Some(1), "the first of a quiet spell at once");
        for i in 0..1000 {
            s.add(1);
            assert_eq!(s.due(t0 + i * MS), None);
        }
        assert_eq!(s.deadline(t0), Some(t0 + Duration::from_secs(5)));
        assert_eq!(s.due(t0 + Duration::from_secs(5)), Some(1000));
        assert_eq!(s.due(t0 + Duration::from_secs(60)), None, "nothing new");
        s.add(3);
        assert_eq!(s.due(t0 + Duration::from_secs(60)), Some(3));
        assert_eq!(s.every(), Duration::from_secs(5));
    }

    #[test]
    fn failures_report_their_count_and_the_last_reason() {
        let t0 = Instant::now();
        let mut f = Failures::new(Duration::from_secs(5));
        assert_eq!(f.deadline(t0), None);
        f.add("one".into());
        f.add("two".into());
        assert_eq!(f.deadline(t0), Some(t0));
        assert_eq!(f.due(t0), Some((2, "two".into())));
        f.add("three".into());
        assert_eq!(f.due(t0 + Duration::from_secs(1)), None);
        assert_eq!(f.deadline(t0), Some(t0 + Duration::from_secs(5)));
        assert_eq!(
            f.due(t0 + Duration::from_secs(5)),
            Some((1, "three".into()))
        );
        assert_eq!(f.due(t0 + Duration::from_secs(20)), None);
    }
}
