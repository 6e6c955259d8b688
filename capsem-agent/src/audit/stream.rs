//! One generation's audit connection: `Hello{token, generation}`, then every
//! unacknowledged record in serial order (those left by earlier generations
//! first), then new records as the reader adds them; `Ack{serial}` from the
//! host removes records from the shared buffer.
//!
//! One poll loop on the stop eventfd, the buffer's wake eventfd and the
//! connection. At most [`HIGH_WATER`] bytes are encoded ahead of the socket,
//! so a host that stops reading leaves the records in the bounded buffer,
//! not in this loop. On the stop, acknowledgements already received are
//! still applied, so they are not re-sent by the next generation.

use std::io;
use std::os::fd::BorrowedFd;

use capsem_proto::audit::{AuditRecord, AuditToHost, HostToAudit};
use capsem_proto::frame::AuditGuest;
use capsem_proto::{Codec, FrameError};

use super::Shared;
use crate::fdio;

/// Encoded bytes kept ahead of the socket.
pub const HIGH_WATER: usize = 64 * 1024;

/// Errors that end an audit connection.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("audit connection I/O failed")]
    Io(#[source] io::Error),
    #[error("the host closed the audit connection")]
    Closed,
    #[error("invalid frame from the host")]
    Frame(#[source] FrameError),
    #[error("cannot encode an audit message")]
    Encode(#[source] FrameError),
}

/// What a connection did before its stop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// Records written into the send queue.
    pub sent: u64,
    /// Records the host acknowledged.
    pub acked: u64,
}

/// Appends `rec` as a frame; a record too large for a frame (the parser's
/// bounds make this unreachable) loses arguments until it fits.
pub fn encode_record(rec: &AuditRecord, out: &mut Vec<u8>) -> Result<(), StreamError> {
    let mut rec = rec.clone();
    loop {
        let msg = AuditToHost::Record(rec);
        let err = match Codec::<AuditGuest>::encode_into(&msg, out) {
            Ok(()) => return Ok(()),
            Err(e @ FrameError::TooLong { .. }) => e,
            Err(e) => return Err(StreamError::Encode(e)),
        };
        rec = match msg {
            AuditToHost::Record(r) if !r.argv.is_empty() => r,
            _ => return Err(StreamError::Encode(err)),
        };
        rec.argv.truncate(rec.argv.len() / 2);
        rec.argv_truncated = true;
    }
}

/// Serves the connection `conn` (connected, nonblocking) until `stop` is
/// readable or the connection fails.
pub fn serve(
    conn: BorrowedFd<'_>,
    token: &str,
    generation: u64,
    shared: &Shared,
    stop: BorrowedFd<'_>,
) -> Result<Served, StreamError> {
    let hello = AuditToHost::Hello {
        token: token.to_owned(),
        generation,
    };
    let mut out = Codec::<AuditGuest>::encode(&hello).map_err(StreamError::Encode)?;
    let mut written = 0usize;
    // The last serial queued on this connection; none yet, so everything
    // still unacknowledged goes out first.
    let mut sent: Option<u64> = None;
    let mut codec = Codec::<AuditGuest>::new();
    let mut served = Served::default();
    let mut buf = [0u8; 4096];
    loop {
        if out.len() - written < HIGH_WATER {
            out.drain(..written);
            written = 0;
            let unacked = shared.lock();
            while out.len() < HIGH_WATER {
                let Some(rec) = unacked.next_after(sent) else {
                    break;
                };
                encode_record(rec, &mut out)?;
                sent = Some(rec.serial);
                served.sent += 1;
            }
        }
        let pending = written < out.len();
        let mut events = fdio::IN;
        if pending {
            events |= fdio::OUT;
        }
        let mut fds = [
            fdio::pollfd(stop, fdio::IN),
            fdio::pollfd(shared.wake_fd(), fdio::IN),
            fdio::pollfd(conn, events),
        ];
        fdio::poll(&mut fds, None).map_err(StreamError::Io)?;
        if fdio::ready(&fds[0]) {
            // Best effort: acks that already arrived spare the next
            // generation a re-send.
            let _ = read_acks(conn, &mut codec, shared, &mut served, &mut buf);
            return Ok(served);
        }
        if fdio::ready(&fds[1]) {
            shared.clear_wake();
        }
        let rev = fds[2].revents;
        if rev & (fdio::IN | libc::POLLHUP | libc::POLLERR) != 0 {
            read_acks(conn, &mut codec, shared, &mut served, &mut buf)?;
        }
        if pending && rev & fdio::OUT != 0 {
            match fdio::write(conn, &out[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(StreamError::Io(e)),
            }
        }
    }
}

/// Reads what the host sent until the socket would block, applying acks.
fn read_acks(
    conn: BorrowedFd<'_>,
    codec: &mut Codec<AuditGuest>,
    shared: &Shared,
    served: &mut Served,
    buf: &mut [u8],
) -> Result<(), StreamError> {
    loop {
        match fdio::read(conn, buf) {
            Ok(0) => return Err(StreamError::Closed),
            Ok(n) => codec.feed(&buf[..n]).map_err(StreamError::Frame)?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(StreamError::Io(e)),
        }
        while let Some(msg) = codec.next_message().map_err(StreamError::Frame)? {
            match msg {
                HostToAudit::Ack { serial } => {
                    served.acked += shared.lock().ack(serial) as u64;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stop::StopSignal;
    use capsem_proto::audit::{MAX_AUDIT_ARGS, MAX_AUDIT_FIELD, MAX_AUDIT_FRAME};
    use capsem_proto::frame::AuditHost;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    fn rec(serial: u64) -> AuditRecord {
        AuditRecord {
            serial,
            time_ms: 1_700_000_000_000 + serial,
            pid: 100 + serial as u32,
            ppid: 1,
            uid: 0,
            exe: "/bin/true".into(),
            argv: vec!["true".into(), format!("n{serial}")],
            argv_truncated: false,
            cwd: "/".into(),
            tty: "(none)".into(),
            success: true,
            audit_id: format!("1700000000.000:{serial}"),
        }
    }

    /// The host's end of one audit connection.
    struct Host {
        sock: UnixStream,
        codec: Codec<AuditHost>,
    }

    impl Host {
        fn recv(&mut self) -> AuditToHost {
            let mut buf = [0u8; 4096];
            loop {
                if let Some(m) = self.codec.next_message().unwrap() {
                    return m;
                }
                let n = self.sock.read(&mut buf).unwrap();
                assert!(n > 0, "agent closed the audit connection");
                self.codec.feed(&buf[..n]).unwrap();
            }
        }

        fn serials(&mut self, n: usize) -> Vec<u64> {
            (0..n)
                .map(|_| match self.recv() {
                    AuditToHost::Record(r) => r.serial,
                    other => panic!("expected a record, got {other:?}"),
                })
                .collect()
        }

        fn ack(&mut self, serial: u64) {
            let frame = Codec::<AuditHost>::encode(&HostToAudit::Ack { serial }).unwrap();
            self.sock.write_all(&frame).unwrap();
        }
    }

    /// Runs `serve` for one generation while `host` plays the host.
    fn generation(shared: &Shared, generation: u64, host: impl FnOnce(&mut Host)) -> Served {
        let (agent, sock) = UnixStream::pair().unwrap();
        agent.set_nonblocking(true).unwrap();
        let stop = StopSignal::new().unwrap();
        std::thread::scope(|s| {
            let h = s.spawn(|| serve(agent.as_fd(), "tok", generation, shared, stop.fd()));
            let mut host_end = Host {
                sock,
                codec: Codec::new(),
            };
            assert_eq!(
                host_end.recv(),
                AuditToHost::Hello {
                    token: "tok".into(),
                    generation
                }
            );
            host(&mut host_end);
            stop.trigger();
            h.join().unwrap().unwrap()
        })
    }

    fn push(shared: &Shared, serials: impl IntoIterator<Item = u64>) {
        let mut b = shared.lock();
        for s in serials {
            b.push(rec(s));
        }
        drop(b);
        shared.notify();
    }

    #[test]
    fn acked_records_are_not_resent_and_unacked_ones_are_in_order() {
        let shared = Shared::new(16, 1 << 20).unwrap();
        push(&shared, [10, 11, 12]);
        let served = generation(&shared, 1, |host| {
            assert_eq!(host.serials(3), [10, 11, 12]);
            // A record added while the connection runs goes out at once.
            push(&shared, [13]);
            assert_eq!(host.serials(1), [13]);
            // The ack arrives right before the stop; it still counts.
            host.ack(11);
        });
        assert_eq!(served.sent, 4);
        assert_eq!(served.acked, 2);
        // Produced between generations.
        push(&shared, [14]);
        let served = generation(&shared, 2, |host| {
            let got = host.serials(3);
            assert_eq!(got, [12, 13, 14]);
            host.ack(14);
            // An ack is applied before the next record is asked for: wait
            // until the buffer is empty.
            let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !shared.lock().is_empty() {
                assert!(std::time::Instant::now() < until, "ack not applied");
                std::thread::yield_now();
            }
        });
        assert_eq!(served.acked, 3);
        assert!(shared.lock().is_empty());
    }

    #[test]
    fn a_host_that_closes_ends_the_connection_with_an_error() {
        let shared = Shared::new(4, 1 << 20).unwrap();
        let (agent, sock) = UnixStream::pair().unwrap();
        agent.set_nonblocking(true).unwrap();
        let stop = StopSignal::new().unwrap();
        drop(sock);
        let got = serve(agent.as_fd(), "tok", 1, &shared, stop.fd());
        assert!(
            matches!(got, Err(StreamError::Closed) | Err(StreamError::Io(_))),
            "{got:?}"
        );
    }

    #[test]
    fn an_oversized_record_loses_arguments_until_it_fits() {
        let mut r = rec(1);
        r.argv = vec!["x".repeat(MAX_AUDIT_FIELD); MAX_AUDIT_ARGS];
        let mut out = Vec::new();
        encode_record(&r, &mut out).unwrap();
        assert!(out.len() <= MAX_AUDIT_FRAME + 4);
        let mut host = Codec::<AuditHost>::new();
        host.feed(&out).unwrap();
        match host.next_message().unwrap() {
            Some(AuditToHost::Record(got)) => {
                assert!(got.argv_truncated);
                assert!(!got.argv.is_empty() && got.argv.len() < MAX_AUDIT_ARGS);
            }
            other => panic!("{other:?}"),
        }
    }
}
