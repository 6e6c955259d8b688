//! Heartbeat bookkeeping, pure: which ping to send, and when the guest turns
//! unresponsive (N consecutive unanswered pings) or responsive again.

/// A change worth telling the client about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Unresponsive { missed: u32 },
    Responsive,
}

#[derive(Debug)]
pub struct Heartbeat {
    threshold: u32,
    /// Sequence number of the last ping sent (0: none yet).
    sent: u64,
    /// Highest sequence number answered.
    acked: u64,
    missed: u32,
    unresponsive: bool,
}

impl Heartbeat {
    pub fn new(threshold: u32) -> Self {
        Self {
            threshold: threshold.max(1),
            sent: 0,
            acked: 0,
            missed: 0,
            unresponsive: false,
        }
    }

    /// A heartbeat period elapsed: counts the previous ping as missed if it
    /// was not answered, and returns the next ping's sequence number.
    pub fn on_tick(&mut self) -> (u64, Option<Transition>) {
        let mut transition = None;
        if self.sent > self.acked {
            self.missed = self.missed.saturating_add(1);
            if self.missed >= self.threshold && !self.unresponsive {
                self.unresponsive = true;
                transition = Some(Transition::Unresponsive {
                    missed: self.missed,
                });
            }
        }
        self.sent += 1;
        (self.sent, transition)
    }

    /// A pong arrived. Sequence numbers we never sent are ignored (`Err`).
    pub fn on_pong(&mut self, seq: u64) -> Result<Option<Transition>, u64> {
        if seq == 0 || seq > self.sent {
            return Err(seq);
        }
        self.acked = self.acked.max(seq);
        self.missed = 0;
        if self.unresponsive {
            self.unresponsive = false;
            return Ok(Some(Transition::Responsive));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answered_pings_never_miss() {
        let mut hb = Heartbeat::new(3);
        for want in 1..10 {
            let (seq, t) = hb.on_tick();
            assert_eq!((seq, t), (want, None));
            assert_eq!(hb.on_pong(seq), Ok(None));
        }
    }

    #[test]
    fn unresponsive_after_threshold_then_responsive() {
        let mut hb = Heartbeat::new(3);
        assert_eq!(hb.on_tick(), (1, None));
        assert_eq!(hb.on_tick(), (2, None)); // 1 missed
        assert_eq!(hb.on_tick(), (3, None)); // 2 missed
        assert_eq!(
            hb.on_tick(),
            (4, Some(Transition::Unresponsive { missed: 3 }))
        );
        assert_eq!(hb.on_tick(), (5, None), "reported once");
        assert_eq!(hb.on_pong(5), Ok(Some(Transition::Responsive)));
        assert_eq!(hb.on_pong(5), Ok(None));
        assert_eq!(hb.on_tick(), (6, None));
    }

    #[test]
    fn bogus_pongs_are_ignored() {
        let mut hb = Heartbeat::new(1);
        assert_eq!(hb.on_pong(1), Err(1));
        let (seq, _) = hb.on_tick();
        assert_eq!(hb.on_pong(seq + 1), Err(seq + 1));
        assert_eq!(hb.on_pong(0), Err(0));
        assert_eq!(hb.on_tick().1, Some(Transition::Unresponsive { missed: 1 }));
    }
}
