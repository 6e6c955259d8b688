//! The network port's bounds per VM beyond the accept loop's
//! ([`super::MAX_CONNS`] at once): the guest is hostile, and the agent's own
//! limits bind only an agent that keeps them.
//!
//! * Questions a second: one token bucket for `Resolve`
//!   ([`RESOLVE_PER_SEC`], [`RESOLVE_BURST`]), one for `Connect`
//!   ([`CONNECT_PER_SEC`], [`CONNECT_BURST`]) and one for `Dropped`
//!   ([`DROPPED_PER_SEC`], [`DROPPED_BURST`]). A question over its bucket
//!   gets a quick refusal (a `Resolve` is closed unanswered, which the
//!   agent answers SERVFAIL and does not remember; a `Connect` is denied
//!   without resolving or dialling; a `Dropped` is denied unrecorded) and
//!   no record of its own.
//! * The refusals over a bucket and the failed connections are counted
//!   and reported at most once per [`SUMMARY_EVERY`] each (the first of a
//!   quiet spell at once): one `process.log` line, and for the refusals
//!   one `net.jsonl` record with its `count`. So a flood writes a line and
//!   a record per interval, never one per question.
//!
//! `$CAPSEM_NET_RATE=N` (tests; a number from 1) sets every bucket to `N`
//! a second and `2N` at once, so that a test under TCG, whose guest cannot
//! reach the real rates, still meets them.
//!
//! The system resolver's lookups at once are bounded separately
//! ([`super::MAX_LOOKUPS`], in `conn.rs`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use capsem_net::rate::{Bucket, Failures, Summary};

/// `Resolve` questions a second, sustained, per VM (well above the agent's
/// own 50, so an honest agent never meets it).
pub const RESOLVE_PER_SEC: u32 = 500;
/// `Resolve` questions at once after a quiet spell.
pub const RESOLVE_BURST: u32 = 1000;
/// `Connect` questions a second, sustained, per VM.
pub const CONNECT_PER_SEC: u32 = 500;
/// `Connect` questions at once after a quiet spell.
pub const CONNECT_BURST: u32 = 1000;
/// `Dropped` questions a second, sustained, per VM (the agent sends at
/// most 64 every 250 ms).
pub const DROPPED_PER_SEC: u32 = 500;
/// `Dropped` questions at once after a quiet spell.
pub const DROPPED_BURST: u32 = 1000;
/// At most one report per kind this often.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(5);
/// Overrides every bucket (tests): `N` a second, `2N` at once.
pub const RATE_ENV: &str = "CAPSEM_NET_RATE";

/// Which bucket a question takes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Resolve,
    Connect,
    Dropped,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Resolve, Kind::Connect, Kind::Dropped];

    /// The `kind` of its `net.jsonl` records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Resolve => "resolve",
            Self::Connect => "connect",
            Self::Dropped => "packet",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Each kind's `(per_sec, burst)`, in [`Kind::ALL`]'s order.
pub type Rates = [(u32, u32); 3];

/// What is due for reporting now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Questions refused over a bucket: the kind, how many, the rate.
    pub throttled: Vec<(Kind, u64, u32)>,
    /// Failed connections: how many, and the last one's error.
    pub failed: Option<(u64, String)>,
}

#[derive(Debug)]
struct Inner {
    buckets: [Bucket; 3],
    refused: [Summary; 3],
    failed: Failures,
}

/// The buckets and the counts, shared by the VM's connection tasks.
#[derive(Debug)]
pub struct Limiter(Mutex<Inner>);

impl Limiter {
    pub fn new(now: Instant) -> Self {
        Self::with(
            [
                (RESOLVE_PER_SEC, RESOLVE_BURST),
                (CONNECT_PER_SEC, CONNECT_BURST),
                (DROPPED_PER_SEC, DROPPED_BURST),
            ],
            now,
        )
    }

    /// The real rates, or [`RATE_ENV`]'s.
    pub fn from_env(now: Instant) -> Self {
        match Self::rate_override(std::env::var(RATE_ENV).ok().as_deref()) {
            Some(n) => Self::with([(n, 2 * n); 3], now),
            None => Self::new(now),
        }
    }

    fn rate_override(value: Option<&str>) -> Option<u32> {
        value?
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1_000_000).contains(n))
    }

    /// Buckets of `(per_sec, burst)`.
    pub fn with(rates: Rates, now: Instant) -> Self {
        Self(Mutex::new(Inner {
            buckets: rates.map(|(per_sec, burst)| Bucket::new(per_sec, burst, now)),
            refused: [(); 3].map(|()| Summary::new(SUMMARY_EVERY)),
            failed: Failures::new(SUMMARY_EVERY),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a question of `kind` may be answered now; a refusal is
    /// counted.
    pub fn admit(&self, kind: Kind, now: Instant) -> bool {
        let mut g = self.lock();
        let ok = g.buckets[kind.index()].take(now);
        if !ok {
            g.refused[kind.index()].add(1);
        }
        ok
    }

    /// Counts a failed connection.
    pub fn failed(&self, why: String) {
        self.lock().failed.add(why);
    }

    /// What is due now (and counted as reported).
    pub fn due(&self, now: Instant) -> Due {
        let mut g = self.lock();
        let mut due = Due::default();
        for kind in Kind::ALL {
            if let Some(n) = g.refused[kind.index()].due(now) {
                let rate = g.buckets[kind.index()].per_sec();
                due.throttled.push((kind, n, rate));
            }
        }
        due.failed = g.failed.due(now);
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_bucket_and_a_flood_is_one_report_per_interval() {
        let t0 = Instant::now();
        let l = Limiter::with([(10, 2), (5, 1), (3, 3)], t0);
        assert_eq!(l.due(t0), Due::default());
        let resolves = (0..100_000).filter(|_| l.admit(Kind::Resolve, t0)).count();
        assert_eq!(resolves, 2);
        // The other buckets are untouched.
        assert!(l.admit(Kind::Connect, t0));
        assert!(!l.admit(Kind::Connect, t0));
        assert_eq!((0..10).filter(|_| l.admit(Kind::Dropped, t0)).count(), 3);
        l.failed("one".into());
        l.failed("two".into());
        assert_eq!(
            l.due(t0),
            Due {
                throttled: vec![
                    (Kind::Resolve, 99_998, 10),
                    (Kind::Connect, 1, 5),
                    (Kind::Dropped, 7, 3)
                ],
                failed: Some((2, "two".into())),
            }
        );
        // Within the interval: counted, not reported.
        assert!(!l.admit(Kind::Resolve, t0));
        assert_eq!(l.due(t0 + Duration::from_secs(1)), Due::default());
        let later = t0 + SUMMARY_EVERY;
        assert_eq!(l.due(later).throttled, vec![(Kind::Resolve, 1, 10)]);
        // The bucket refilled: questions go through again.
        assert!(l.admit(Kind::Resolve, later));
        assert_eq!(Kind::Connect.as_str(), "connect");
        assert_eq!(Kind::Dropped.as_str(), "packet");
    }

    #[test]
    fn the_rate_override() {
        assert_eq!(Limiter::rate_override(Some("20")), Some(20));
        for bad in [
            None,
            Some(""),
            Some("0"),
            Some("-1"),
            Some("x"),
            Some("2000000"),
        ] {
            assert_eq!(Limiter::rate_override(bad), None, "{bad:?}");
        }
    }
}
