//! The agent's byte relays: a published port's (the host's vsock
//! connection and the guest server's TCP connection) and the egress
//! proxy's (the guest client's socket and the host's vsock connection).
//! Both fds nonblocking, in one poll loop that also watches the stop
//! signal, one bounded buffer ([`RELAY_BUF`]) per direction. How it ends
//! is the caller's [`Ends`]:
//!
//! * [`Ends::First`]: the first side to end ends the relay, once the bytes
//!   already read from it are written on. vhost-device-vsock passes no
//!   half-close in either direction (the host's end closing reaches the
//!   guest as a full shutdown, and a guest `shutdown(SHUT_WR)` never
//!   reaches the host's socket), so for a published port the server
//!   finishing its reply is made a close of the vsock connection, which
//!   the host's client sees as EOF.
//! * [`Ends::Both`]: each direction ends on its own and its sink is shut
//!   for writing (a half-close the guest's peer sees as EOF); the relay
//!   ends when both have, or after `idle` without a byte once one has (a
//!   half-close the host never sees would otherwise hold both ends).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{shutdown, Shutdown};
use tracing::debug;

use crate::fdio;

/// Each direction's buffer.
pub const RELAY_BUF: usize = 16 * 1024;

/// When a relay ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ends {
    First,
    Both { idle: Duration },
}

/// One direction: bytes read but not yet written, whether its source
/// ended, and whether its sink was shut for writing.
#[derive(Debug, Default)]
struct Pipe {
    buf: Vec<u8>,
    sent: usize,
    eof: bool,
    shut: bool,
}

impl Pipe {
    fn empty(&self) -> bool {
        self.sent == self.buf.len()
    }
    fn done(&self) -> bool {
        self.eof && self.empty()
    }
    /// What to poll for: the source while empty, the sink while not.
    fn want(&self) -> (i16, i16) {
        if !self.empty() {
            (0, fdio::OUT)
        } else if !self.eof {
            (fdio::IN, 0)
        } else {
            (0, 0)
        }
    }
}

/// Moves bytes between `a` and `b` until they end as `ends` says, one
/// fails, or `stop`.
pub fn relay(
    a: BorrowedFd<'_>,
    b: BorrowedFd<'_>,
    stop: BorrowedFd<'_>,
    ends: Ends,
) -> io::Result<()> {
    fdio::set_nonblocking(a)?;
    fdio::set_nonblocking(b)?;
    let half_close = matches!(ends, Ends::Both { .. });
    let mut up = Pipe::default(); // a -> b
    let mut down = Pipe::default(); // b -> a
    let mut chunk = vec![0u8; RELAY_BUF];
    loop {
        let over = match ends {
            Ends::First => up.done() || down.done(),
            Ends::Both { .. } => up.done() && down.done(),
        };
        if over {
            return Ok(());
        }
        let (up_in, up_out) = up.want();
        let (down_in, down_out) = down.want();
        let mut fds = [
            fdio::pollfd(stop, fdio::IN),
            fdio::pollfd(a, up_in | down_out),
            fdio::pollfd(b, down_in | up_out),
        ];
        // poll(2) skips a negative fd: a side with nothing to wait for
        // (its direction done, nothing to write to it) must not wake the
        // loop with POLLHUP again and again until the other side ends.
        for p in &mut fds[1..] {
            if p.events == 0 {
                p.fd = -1;
            }
        }
        let idle = match ends {
            Ends::Both { idle } if up.eof || down.eof => Some((idle, Instant::now() + idle)),
            _ => None,
        };
        if fdio::poll(&mut fds, idle.map(|(_, at)| at))? == 0 {
            if let Some((idle, _)) = idle {
                debug!("relay idle {idle:?} after one side ended; closing");
            }
            return Ok(());
        }
        if fdio::ready(&fds[0]) {
            return Ok(());
        }
        pump(&mut up, a, b, &mut chunk, half_close)?;
        pump(&mut down, b, a, &mut chunk, half_close)?;
    }
}

/// Advances one direction as far as it goes without blocking.
fn pump(
    p: &mut Pipe,
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    chunk: &mut [u8],
    half_close: bool,
) -> io::Result<()> {
    if p.empty() && !p.eof {
        match fdio::read(from, chunk) {
            Ok(0) => p.eof = true,
            Ok(n) => {
                p.buf.clear();
                p.buf.extend_from_slice(&chunk[..n]);
                p.sent = 0;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    while !p.empty() {
        match fdio::write(to, &p.buf[p.sent..]) {
            Ok(n) => p.sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    if half_close && p.done() && !p.shut {
        p.shut = true;
        // The peer sees EOF; the other direction goes on. A socket that is
        // already gone has nothing to tell.
        let _ = shutdown(to.as_raw_fd(), Shutdown::Write);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stop::StopSignal;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn relays_both_ways_and_ends_with_the_first_side_done() {
        let (host_end, host) = UnixStream::pair().unwrap();
        let (server_end, server) = UnixStream::pair().unwrap();
        let stop = StopSignal::new().unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let t = std::thread::spawn(move || {
            relay(host_end.as_fd(), server_end.as_fd(), stop.fd(), Ends::First).unwrap();
        });
        let (mut host, mut server) = (host, server);
        host.write_all(b"request").unwrap();
        let mut got = [0u8; 7];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"request");
        // More than both buffers, then the server ends: all of it arrives,
        // then EOF.
        let writer = {
            let big = big.clone();
            std::thread::spawn(move || {
                server.write_all(&big).unwrap();
                drop(server);
            })
        };
        let mut back = Vec::new();
        host.read_to_end(&mut back).unwrap();
        assert_eq!(back, big);
        writer.join().unwrap();
        t.join().unwrap();
    }

    #[test]
    fn both_passes_each_half_close_on_and_ends_when_both_are_done() {
        let (a_end, mut a) = UnixStream::pair().unwrap();
        let (b_end, mut b) = UnixStream::pair().unwrap();
        let stop = StopSignal::new().unwrap();
        let ends = Ends::Both {
            idle: std::time::Duration::from_secs(60),
        };
        let t = std::thread::spawn(move || relay(a_end.as_fd(), b_end.as_fd(), stop.fd(), ends));
        a.write_all(b"question").unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        // b sees the bytes, then EOF, while its own direction stays open.
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"question");
        b.write_all(b"answer").unwrap();
        drop(b);
        let mut back = Vec::new();
        a.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"answer");
        t.join().unwrap().unwrap();
    }

    #[test]
    fn both_ends_after_the_idle_bound_once_one_side_ended() {
        let (a_end, a) = UnixStream::pair().unwrap();
        let (b_end, _b) = UnixStream::pair().unwrap();
        let stop = StopSignal::new().unwrap();
        let ends = Ends::Both {
            idle: std::time::Duration::from_millis(50),
        };
        let t = std::thread::spawn(move || relay(a_end.as_fd(), b_end.as_fd(), stop.fd(), ends));
        drop(a);
        // b never ends its side; the idle bound does.
        t.join().unwrap().unwrap();
    }

    #[test]
    fn the_stop_ends_an_idle_relay() {
        let (host_end, _host) = UnixStream::pair().unwrap();
        let (server_end, _server) = UnixStream::pair().unwrap();
        let stop = std::sync::Arc::new(StopSignal::new().unwrap());
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            relay(host_end.as_fd(), server_end.as_fd(), s.fd(), Ends::First)
        });
        stop.trigger();
        t.join().unwrap().unwrap();
    }
}
