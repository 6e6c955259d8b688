//! Capped, jittered exponential backoff between connection attempts.
//!
//! The base delay starts at [`INITIAL`], doubles after every attempt up to
//! [`MAX`], and resets after a successful hello. Each delay is the base with
//! ±50 % uniform jitter, so every delay lies in `[INITIAL/2, MAX*3/2]` and
//! agents restarted together do not reconnect in lockstep. The wait itself is
//! a poll on a cancel fd (the termination signalfd) with the delay as timeout.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use crate::fdio;

/// First base delay.
pub const INITIAL: Duration = Duration::from_millis(50);
/// Largest base delay.
pub const MAX: Duration = Duration::from_secs(2);

/// Errors setting up the backoff.
#[derive(Debug, thiserror::Error)]
pub enum ReconnectError {
    // getrandom 0.2's error is not a std error without its `std` feature.
    #[error("cannot seed the backoff jitter: {0}")]
    Seed(getrandom::Error),
    #[error("waiting between connection attempts failed")]
    Wait(#[source] io::Error),
}

/// Backoff state: the next base delay and the jitter generator.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    rng: XorShift64,
}

impl Backoff {
    /// A backoff seeded from the OS entropy source.
    pub fn from_entropy() -> Result<Self, ReconnectError> {
        let mut seed = [0u8; 8];
        getrandom::getrandom(&mut seed).map_err(ReconnectError::Seed)?;
        Ok(Self::with_seed(u64::from_ne_bytes(seed)))
    }

    pub fn with_seed(seed: u64) -> Self {
        Self {
            base: INITIAL,
            rng: XorShift64::new(seed),
        }
    }

    /// The delay before the next attempt; advances the base.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base;
        self.base = (base * 2).min(MAX);
        // Uniform in [base/2, base*3/2).
        let micros = base.as_micros() as u64;
        let jitter = self.rng.next() % micros.max(1);
        Duration::from_micros(micros / 2 + jitter)
    }

    /// After a successful hello the next failure starts from [`INITIAL`].
    pub fn reset(&mut self) {
        self.base = INITIAL;
    }
}

/// How a backoff wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    Elapsed,
    /// `cancel` became readable.
    Cancelled,
}

/// Waits `delay`, or less if `cancel` becomes readable.
pub fn wait(delay: Duration, cancel: BorrowedFd<'_>) -> Result<Waited, ReconnectError> {
    let mut fds = [fdio::pollfd(cancel, fdio::IN)];
    let n = fdio::poll(&mut fds, Some(Instant::now() + delay)).map_err(ReconnectError::Wait)?;
    Ok(if n == 0 {
        Waited::Elapsed
    } else {
        Waited::Cancelled
    })
}

/// xorshift64: plenty for jitter, seeded once from getrandom.
#[derive(Debug, Clone)]
struct XorShift64(u64);

impl XorShift64 {
    fn new(seed: u64) -> Self {
        // Zero is the one fixed point of xorshift.
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn delays_double_to_the_cap_within_jitter_bounds() {
        for seed in [0, 1, 42, u64::MAX, 0xdead_beef] {
            let mut b = Backoff::with_seed(seed);
            let mut base = INITIAL;
            for _ in 0..20 {
                let d = b.next_delay();
                assert!(d >= base / 2, "{d:?} below half of {base:?}");
                assert!(d < base * 3 / 2, "{d:?} at or above 1.5 x {base:?}");
                base = (base * 2).min(MAX);
            }
            // Capped: the base stays at MAX.
            assert_eq!(b.base, MAX);
            assert!(b.next_delay() < MAX * 3 / 2);
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::with_seed(7);
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() < INITIAL * 3 / 2);
    }

    #[test]
    fn jitter_spreads_over_the_range() {
        let mut lo = Duration::MAX;
        let mut hi = Duration::ZERO;
        let mut b = Backoff::with_seed(12345);
        for _ in 0..2000 {
            b.reset();
            let d = b.next_delay();
            lo = lo.min(d);
            hi = hi.max(d);
        }
        // Both halves of ±50 % are used.
        assert!(lo < INITIAL * 6 / 10, "{lo:?}");
        assert!(hi > INITIAL * 14 / 10, "{hi:?}");
    }

    #[test]
    fn wait_is_cancelled_by_the_fd_and_elapses_without_it() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let start = Instant::now();
        assert_eq!(
            wait(Duration::from_millis(20), a.as_fd()).unwrap(),
            Waited::Elapsed
        );
        assert!(start.elapsed() >= Duration::from_millis(20));
        std::io::Write::write_all(&mut &b, b"x").unwrap();
        let start = Instant::now();
        assert_eq!(
            wait(Duration::from_secs(60), a.as_fd()).unwrap(),
            Waited::Cancelled
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
