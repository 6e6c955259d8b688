//! A published port's relay in the guest: the host's vsock connection and
//! the guest server's TCP connection, both nonblocking, in one poll loop
//! that also watches the stop signal, one bounded buffer ([`RELAY_BUF`])
//! per direction.
//!
//! The first side to end ends the relay, once the bytes already read from
//! it are written on: vhost-device-vsock passes no half-close in either
//! direction (the host's end closing reaches the guest as a full shutdown,
//! and a guest `shutdown(SHUT_WR)` never reaches the host's socket), so
//! the server finishing its reply is made a close of the vsock connection,
//! which the host's client sees as EOF.

use std::io;
use std::os::fd::BorrowedFd;

use crate::fdio;

/// Each direction's buffer.
pub const RELAY_BUF: usize = 16 * 1024;

/// One direction: bytes read but not yet written, and whether its source
/// ended.
#[derive(Debug, Default)]
struct Pipe {
    buf: Vec<u8>,
    sent: usize,
    eof: bool,
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

/// Moves bytes between `host` and `server` until one side ended (its
/// bytes written on), one failed, or `stop`.
pub fn relay(host: BorrowedFd<'_>, server: BorrowedFd<'_>, stop: BorrowedFd<'_>) -> io::Result<()> {
    fdio::set_nonblocking(host)?;
    fdio::set_nonblocking(server)?;
    let mut up = Pipe::default(); // host -> server
    let mut down = Pipe::default(); // server -> host
    let mut chunk = vec![0u8; RELAY_BUF];
    while !(up.done() || down.done()) {
        let (up_in, up_out) = up.want();
        let (down_in, down_out) = down.want();
        let mut fds = [
            fdio::pollfd(stop, fdio::IN),
            fdio::pollfd(host, up_in | down_out),
            fdio::pollfd(server, down_in | up_out),
        ];
        fdio::poll(&mut fds, None)?;
        if fdio::ready(&fds[0]) {
            return Ok(());
        }
        pump(&mut up, host, server, &mut chunk)?;
        pump(&mut down, server, host, &mut chunk)?;
    }
    Ok(())
}

/// Advances one direction as far as it goes without blocking.
fn pump(
    p: &mut Pipe,
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    chunk: &mut [u8],
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
            relay(host_end.as_fd(), server_end.as_fd(), stop.fd()).unwrap();
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
    fn the_stop_ends_an_idle_relay() {
        let (host_end, _host) = UnixStream::pair().unwrap();
        let (server_end, _server) = UnixStream::pair().unwrap();
        let stop = std::sync::Arc::new(StopSignal::new().unwrap());
        let s = stop.clone();
        let t = std::thread::spawn(move || relay(host_end.as_fd(), server_end.as_fd(), s.fd()));
        stop.trigger();
        t.join().unwrap().unwrap();
    }
}
