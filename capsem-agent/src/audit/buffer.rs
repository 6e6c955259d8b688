//! The records the host has not acknowledged yet, kept for the agent's whole
//! life so that a new generation's audit connection sends them again first.
//!
//! Records enter in increasing serial order and leave when an `Ack{serial}`
//! covers them. The buffer is bounded in records and in bytes (a record can
//! carry up to about 56 KiB of arguments): when either bound is passed, the
//! oldest records are dropped and counted, so a host that stops
//! acknowledging costs memory up to the bounds and no more. Each connection keeps its own cursor (the last
//! serial it sent) and asks for the first record after it; a new connection
//! starts with no cursor and so re-sends everything still here.

use std::collections::VecDeque;

use capsem_proto::audit::AuditRecord;

/// Records kept by default.
pub const UNACKED_CAP: usize = 4096;
/// Bytes (as [`approx_size`] counts them) kept by default.
pub const UNACKED_BYTES: usize = 16 * 1024 * 1024;

/// A record's memory, roughly: its strings plus a fixed overhead.
pub fn approx_size(r: &AuditRecord) -> usize {
    let strings = r.exe.len() + r.cwd.len() + r.tty.len() + r.audit_id.len();
    let args: usize = r.argv.iter().map(|a| a.len() + 24).sum();
    128 + strings + args
}

/// What [`Unacked::push`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Kept,
    /// Kept, and the oldest records were dropped to make room.
    DroppedOldest,
    /// Refused: its serial is not above the last one pushed.
    OutOfOrder,
}

/// Bounded, serial-ordered records awaiting acknowledgement.
#[derive(Debug)]
pub struct Unacked {
    records: VecDeque<AuditRecord>,
    cap: usize,
    max_bytes: usize,
    /// [`approx_size`] of every record held.
    bytes: usize,
    last_pushed: Option<u64>,
    /// Dropped since the last [`Unacked::take_dropped`].
    dropped: u64,
}

impl Unacked {
    /// A buffer of at most `cap` records (at least one) and `max_bytes`
    /// bytes (the newest record is always kept).
    pub fn new(cap: usize, max_bytes: usize) -> Self {
        Self {
            records: VecDeque::new(),
            cap: cap.max(1),
            max_bytes,
            bytes: 0,
            last_pushed: None,
            dropped: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Appends `rec`, dropping the oldest records while over a bound.
    pub fn push(&mut self, rec: AuditRecord) -> Pushed {
        if self.last_pushed.is_some_and(|last| rec.serial <= last) {
            return Pushed::OutOfOrder;
        }
        self.last_pushed = Some(rec.serial);
        let size = approx_size(&rec);
        let mut dropped = false;
        while !self.records.is_empty()
            && (self.records.len() >= self.cap || self.bytes + size > self.max_bytes)
        {
            self.pop_front();
            self.dropped += 1;
            dropped = true;
        }
        self.bytes += size;
        self.records.push_back(rec);
        if dropped {
            Pushed::DroppedOldest
        } else {
            Pushed::Kept
        }
    }

    /// Forgets every record up to and including `serial`; returns how many.
    pub fn ack(&mut self, serial: u64) -> usize {
        let n = self.records.partition_point(|r| r.serial <= serial);
        for _ in 0..n {
            self.pop_front();
        }
        n
    }

    fn pop_front(&mut self) {
        if let Some(r) = self.records.pop_front() {
            self.bytes -= approx_size(&r);
        }
    }

    /// The first record after `sent` (the last serial a connection sent;
    /// `None`: nothing sent yet).
    pub fn next_after(&self, sent: Option<u64>) -> Option<&AuditRecord> {
        let i = match sent {
            None => 0,
            Some(s) => self.records.partition_point(|r| r.serial <= s),
        };
        self.records.get(i)
    }

    /// Records dropped since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(serial: u64) -> AuditRecord {
        AuditRecord {
            serial,
            time_ms: 0,
            pid: 1,
            ppid: 0,
            uid: 0,
            exe: "/bin/true".into(),
            argv: vec!["true".into()],
            argv_truncated: false,
            cwd: "/".into(),
            tty: "(none)".into(),
            success: true,
            audit_id: format!("0.000:{serial}"),
        }
    }

    /// Sends everything after `sent`, like a connection does.
    fn send_all(buf: &Unacked, mut sent: Option<u64>) -> (Vec<u64>, Option<u64>) {
        let mut got = Vec::new();
        while let Some(r) = buf.next_after(sent) {
            got.push(r.serial);
            sent = Some(r.serial);
        }
        (got, sent)
    }

    #[test]
    fn acked_records_are_not_resent_and_unacked_ones_are_in_order() {
        let mut buf = Unacked::new(16, UNACKED_BYTES);
        for s in [10, 11, 12, 13] {
            assert_eq!(buf.push(rec(s)), Pushed::Kept);
        }
        // Generation 1 sends all four; the host acks up to 11.
        let (sent1, cursor) = send_all(&buf, None);
        assert_eq!(sent1, [10, 11, 12, 13]);
        assert_eq!(buf.ack(11), 2);
        // A record arrives while generation 1 still runs: only it is new.
        buf.push(rec(14));
        assert_eq!(send_all(&buf, cursor).0, [14]);
        // Generation 2 starts from scratch: the unacked ones, in order.
        assert_eq!(send_all(&buf, None).0, [12, 13, 14]);
        // An ack beyond everything empties the buffer.
        assert_eq!(buf.ack(100), 3);
        assert!(buf.is_empty());
        assert_eq!(send_all(&buf, None).0, Vec::<u64>::new());
        // An old ack changes nothing.
        buf.push(rec(101));
        assert_eq!(buf.ack(5), 0);
        assert_eq!(buf.len(), 1);
    }

    #[test]
    fn full_buffer_drops_the_oldest_and_counts() {
        let mut buf = Unacked::new(3, UNACKED_BYTES);
        for s in 1..=3 {
            assert_eq!(buf.push(rec(s)), Pushed::Kept);
        }
        assert_eq!(buf.push(rec(4)), Pushed::DroppedOldest);
        assert_eq!(buf.push(rec(5)), Pushed::DroppedOldest);
        assert_eq!(buf.take_dropped(), 2);
        assert_eq!(buf.take_dropped(), 0);
        assert_eq!(send_all(&buf, None).0, [3, 4, 5]);
        // A cursor that points at a dropped record still finds the next.
        assert_eq!(send_all(&buf, Some(1)).0, [3, 4, 5]);
    }

    #[test]
    fn out_of_order_pushes_are_refused() {
        let mut buf = Unacked::new(3, UNACKED_BYTES);
        buf.push(rec(5));
        assert_eq!(buf.push(rec(5)), Pushed::OutOfOrder);
        assert_eq!(buf.push(rec(4)), Pushed::OutOfOrder);
        buf.ack(5);
        assert_eq!(buf.push(rec(3)), Pushed::OutOfOrder);
        assert!(buf.is_empty());
    }

    #[test]
    fn the_byte_bound_drops_the_oldest_too() {
        let big = |serial| {
            let mut r = rec(serial);
            r.argv = vec!["x".repeat(1000); 10];
            r
        };
        let one = approx_size(&big(1));
        let mut buf = Unacked::new(100, 3 * one);
        for s in 1..=3 {
            assert_eq!(buf.push(big(s)), Pushed::Kept);
        }
        assert_eq!(buf.push(big(4)), Pushed::DroppedOldest);
        assert_eq!(send_all(&buf, None).0, [2, 3, 4]);
        assert_eq!(buf.bytes, 3 * one);
        buf.ack(3);
        assert_eq!(buf.bytes, one);
        // A record larger than the bound on its own is still kept, alone.
        let mut huge = big(5);
        huge.argv = vec!["y".repeat(10 * one)];
        assert_eq!(buf.push(huge), Pushed::DroppedOldest);
        assert_eq!(send_all(&buf, None).0, [5]);
        assert_eq!(buf.take_dropped(), 2);
    }
}
