//! What stands between the resolver and the host for a name it has not
//! seen: the names the host refused ([`Refused`], bounded, answered
//! NXDOMAIN again without asking), then a token bucket ([`ASK_PER_SEC`],
//! [`ASK_BURST`]) on the questions to the host, then room among the
//! questions waiting for an asker ([`dns::ASK_QUEUE`](super::dns::ASK_QUEUE)).
//! A name over either is REFUSED at once, never queued. Throttled queries
//! and failed questions are counted and logged once per [`SUMMARY_EVERY`]
//! ([`Gate::report`]), never a line per query.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use capsem_net::rate::{Bucket, Failures, Summary};
use tracing::warn;

use super::dns::{Decision, ASK_QUEUE};

/// Questions to the host a second, sustained: new names only (a known or
/// refused name costs none), and each question is a vsock connection,
/// which under TCG costs the guest milliseconds of CPU.
pub const ASK_PER_SEC: u32 = 50;
/// Questions to the host at once, after a quiet spell.
pub const ASK_BURST: u32 = 200;
/// Refused names remembered; the oldest is forgotten first.
pub const MAX_REFUSED: usize = 4096;
/// At most one log line per kind of trouble this often.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(5);

/// Names the host refused, bounded ([`MAX_REFUSED`], oldest out first).
/// The policy does not change while the VM runs, so a refusal holds.
#[derive(Debug)]
pub struct Refused {
    names: HashSet<String>,
    order: VecDeque<String>,
    cap: usize,
}

impl Refused {
    pub fn new(cap: usize) -> Self {
        Self {
            names: HashSet::new(),
            order: VecDeque::new(),
            cap: cap.clamp(1, MAX_REFUSED),
        }
    }

    pub fn insert(&mut self, name: &str) {
        if self.names.contains(name) {
            return;
        }
        if self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                self.names.remove(&old);
            }
        }
        self.names.insert(name.to_owned());
        self.order.push_back(name.to_owned());
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

/// What [`Gate::admit`] says about a name not seen yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The host refused it before: NXDOMAIN.
    Denied,
    /// Over the rate: REFUSED.
    Throttled,
    /// Ask the host.
    Ask,
}

/// The refused names, the bucket, and the counts to report.
#[derive(Debug)]
pub struct Gate {
    refused: Refused,
    bucket: Bucket,
    throttled: Summary,
    failed: Failures,
}

impl Gate {
    pub fn new(now: Instant) -> Self {
        Self::with(ASK_PER_SEC, ASK_BURST, MAX_REFUSED, now)
    }

    pub fn with(per_sec: u32, burst: u32, refused: usize, now: Instant) -> Self {
        Self {
            refused: Refused::new(refused),
            bucket: Bucket::new(per_sec, burst, now),
            throttled: Summary::new(SUMMARY_EVERY),
            failed: Failures::new(SUMMARY_EVERY),
        }
    }

    /// What to do with a name the resolver has not seen: a remembered
    /// refusal, over the rate (counted), or ask the host.
    pub fn admit(&mut self, name: &str, now: Instant) -> Admit {
        if self.refused.contains(name) {
            return Admit::Denied;
        }
        if !self.bucket.take(now) {
            self.throttled.add(1);
            return Admit::Throttled;
        }
        Admit::Ask
    }

    /// A name admitted that found no room among the waiting questions:
    /// counted with the throttled ones.
    pub fn busy(&mut self) {
        self.throttled.add(1);
    }

    /// The host's answer about `name` (or why there is none), remembered.
    pub fn answered(&mut self, name: &str, answer: Result<bool, String>) -> Decision {
        match answer {
            Ok(true) => Decision::Allowed,
            Ok(false) => {
                self.refused.insert(name);
                Decision::Denied
            }
            Err(why) => {
                self.failed.add(why);
                Decision::Unknown
            }
        }
    }

    /// The lines due now (also logged): at most one per kind per
    /// [`SUMMARY_EVERY`].
    pub fn report(&mut self, now: Instant) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(n) = self.throttled.due(now) {
            lines.push(format!(
                "dns: {n} queries refused: over {} questions to the host a second, or {ASK_QUEUE} waiting (reported at most every {SUMMARY_EVERY:?})",
                self.bucket.per_sec()
            ));
        }
        if let Some((n, last)) = self.failed.due(now) {
            lines.push(format!(
                "dns: {n} questions to the host failed (SERVFAIL); the last: {last}"
            ));
        }
        for l in &lines {
            warn!("{l}");
        }
        lines
    }

    /// When the next report is due, if anything is counted.
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        self.throttled
            .deadline(now)
            .into_iter()
            .chain(self.failed.deadline(now))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `decide` as the resolver does it, the host's answer from `ask`.
    fn decide(
        g: &mut Gate,
        name: &str,
        now: Instant,
        ask: &mut dyn FnMut(&str) -> Result<bool, String>,
    ) -> Decision {
        match g.admit(name, now) {
            Admit::Denied => Decision::Denied,
            Admit::Throttled => Decision::Throttled,
            Admit::Ask => {
                let answer = ask(name);
                g.answered(name, answer)
            }
        }
    }

    #[test]
    fn refusals_are_remembered_and_the_rest_is_rate_limited() {
        let t0 = Instant::now();
        let mut g = Gate::with(10, 3, 2, t0);
        let asked = std::cell::RefCell::new(Vec::new());
        let mut ask = |n: &str| {
            asked.borrow_mut().push(n.to_owned());
            Ok(n.starts_with("ok"))
        };
        assert_eq!(decide(&mut g, "no1", t0, &mut ask), Decision::Denied);
        // A repeat costs no question and no token.
        for _ in 0..100 {
            assert_eq!(decide(&mut g, "no1", t0, &mut ask), Decision::Denied);
        }
        assert_eq!(decide(&mut g, "ok1", t0, &mut ask), Decision::Allowed);
        assert_eq!(decide(&mut g, "no2", t0, &mut ask), Decision::Denied);
        // The burst (3) is spent: throttled at once, not asked.
        assert_eq!(decide(&mut g, "ok2", t0, &mut ask), Decision::Throttled);
        assert_eq!(decide(&mut g, "no3", t0, &mut ask), Decision::Throttled);
        assert_eq!(*asked.borrow(), ["no1", "ok1", "no2"]);
        // 100 ms at 10/s: one more question.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(decide(&mut g, "no3", t1, &mut ask), Decision::Denied);
        // Bounded (cap 2): no1 was forgotten for no3, so it needs a token
        // again, and there is none.
        assert_eq!(decide(&mut g, "no2", t1, &mut ask), Decision::Denied);
        assert_eq!(decide(&mut g, "no1", t1, &mut ask), Decision::Throttled);
    }

    #[test]
    fn a_flood_is_one_line_per_interval() {
        let t0 = Instant::now();
        let mut g = Gate::with(1, 1, 16, t0);
        let mut ask = |_: &str| Err("the host is gone".to_owned());
        assert!(g.report(t0).is_empty());
        assert_eq!(g.deadline(t0), None);
        assert_eq!(decide(&mut g, "a", t0, &mut ask), Decision::Unknown);
        for i in 0..100_000 {
            assert_eq!(
                decide(&mut g, &format!("n{i}"), t0, &mut ask),
                Decision::Throttled
            );
        }
        g.busy();
        let lines = g.report(t0);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("dns: 100001 queries refused"),
            "{lines:?}"
        );
        assert!(
            lines[1].contains("1 questions to the host failed"),
            "{lines:?}"
        );
        assert!(lines[1].contains("the host is gone"), "{lines:?}");
        for i in 0..10 {
            let _ = decide(&mut g, &format!("m{i}"), t0, &mut ask);
        }
        assert!(g.report(t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(g.deadline(t0), Some(t0 + SUMMARY_EVERY));
        let lines = g.report(t0 + SUMMARY_EVERY);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("dns: 10 queries refused"), "{lines:?}");
    }
}
