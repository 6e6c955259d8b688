//! The network port's bounds per VM beyond the accept loop's
//! ([`super::MAX_CONNS`] at once): the guest is hostile, and the agent's own
//! limits bind only an agent that keeps them.
//!
//! * Questions a second: one token bucket for `Resolve`
//!   ([`RESOLVE_PER_SEC`], [`RESOLVE_BURST`]) and one for `Connect`
//!   ([`CONNECT_PER_SEC`], [`CONNECT_BURST`]). A question over its bucket
//!   gets a quick refusal (a `Resolve` is closed unanswered, which the
//!   agent answers SERVFAIL and does not remember; a `Connect` is denied
//!   without resolving or dialling) and no record of its own.
//! * The refusals over a bucket and the failed connections are counted
//!   and reported at most once per [`SUMMARY_EVERY`] each (the first of a
//!   quiet spell at once): one `process.log` line, and for the refusals
//!   one `net.jsonl` record with its `count`. So a flood writes a line and
//!   a record per interval, never one per question.
//!
//! `$CAPSEM_NET_RATE=N` (tests; a number from 1) sets both buckets to `N`
//! a second and `2N` at once, so that a test under TCG, whose guest cannot
//! reach the real rates, still meets them.
//!
//! The system resolver's lookups at once are bounded separately
//! ([`super::MAX_LOOKUPS`], in `conn.rs`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use capsem_net::rate::{Bucket, Summary};

/// `Resolve` questions a second, sustained, per VM (well above the agent's
/// own 50, so an honest agent never meets it).
pub const RESOLVE_PER_SEC: u32 = 500;
/// `Resolve` questions at once after a quiet spell.
pub const RESOLVE_BURST: u32 = 1000;
/// `Connect` questions a second, sustained, per VM.
pub const CONNECT_PER_SEC: u32 = 500;
/// `Connect` questions at once after a quiet spell.
pub const CONNECT_BURST: u32 = 1000;
/// At most one report per kind this often.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(5);
/// Overrides both buckets (tests): `N` a second, `2N` at once.
pub const RATE_ENV: &str = "CAPSEM_NET_RATE";

/// Which bucket a question takes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Resolve,
    Connect,
}

impl Kind {
    /// The `kind` of its `net.jsonl` records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Resolve => "resolve",
            Self::Connect => "connect",
        }
    }
}

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
    resolve: Bucket,
    connect: Bucket,
    resolve_refused: Summary,
    connect_refused: Summary,
    failed: Summary,
    last_failure: Option<String>,
}

/// The buckets and the counts, shared by the VM's connection tasks.
#[derive(Debug)]
pub struct Limiter(Mutex<Inner>);

impl Limiter {
    pub fn new(now: Instant) -> Self {
        Self::with(
            (RESOLVE_PER_SEC, RESOLVE_BURST),
            (CONNECT_PER_SEC, CONNECT_BURST),
            now,
        )
    }

    /// The real rates, or [`RATE_ENV`]'s.
    pub fn from_env(now: Instant) -> Self {
        match Self::rate_override(std::env::var(RATE_ENV).ok().as_deref()) {
            Some(n) => Self::with((n, 2 * n), (n, 2 * n), now),
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
    pub fn with(resolve: (u32, u32), connect: (u32, u32), now: Instant) -> Self {
        Self(Mutex::new(Inner {
            resolve: Bucket::new(resolve.0, resolve.1, now),
            connect: Bucket::new(connect.0, connect.1, now),
            resolve_refused: Summary::new(SUMMARY_EVERY),
            connect_refused: Summary::new(SUMMARY_EVERY),
            failed: Summary::new(SUMMARY_EVERY),
            last_failure: None,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a question of `kind` may be answered now; a refusal is
    /// counted.
    pub fn admit(&self, kind: Kind, now: Instant) -> bool {
        let mut guard = self.lock();
        let g = &mut *guard;
        let (bucket, refused) = match kind {
            Kind::Resolve => (&mut g.resolve, &mut g.resolve_refused),
            Kind::Connect => (&mut g.connect, &mut g.connect_refused),
        };
        let ok = bucket.take(now);
        if !ok {
            refused.add(1);
        }
        ok
    }

    /// Counts a failed connection.
    pub fn failed(&self, why: String) {
        let mut g = self.lock();
        g.failed.add(1);
        g.last_failure = Some(why);
    }

    /// What is due now (and counted as reported).
    pub fn due(&self, now: Instant) -> Due {
        let mut g = self.lock();
        let mut due = Due::default();
        let rates = (g.resolve.per_sec(), g.connect.per_sec());
        if let Some(n) = g.resolve_refused.due(now) {
            due.throttled.push((Kind::Resolve, n, rates.0));
        }
        if let Some(n) = g.connect_refused.due(now) {
            due.throttled.push((Kind::Connect, n, rates.1));
        }
        if let Some(n) = g.failed.due(now) {
            due.failed = Some((n, g.last_failure.take().unwrap_or_default()));
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_bucket_and_a_flood_is_one_report_per_interval() {
        let t0 = Instant::now();
        let l = Limiter::with((10, 2), (5, 1), t0);
        assert_eq!(l.due(t0), Due::default());
        let resolves = (0..100_000).filter(|_| l.admit(Kind::Resolve, t0)).count();
        assert_eq!(resolves, 2);
        // The other bucket is untouched.
        assert!(l.admit(Kind::Connect, t0));
        assert!(!l.admit(Kind::Connect, t0));
        l.failed("one".into());
        l.failed("two".into());
        assert_eq!(
            l.due(t0),
            Due {
                throttled: vec![(Kind::Resolve, 99_998, 10), (Kind::Connect, 1, 5)],
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
