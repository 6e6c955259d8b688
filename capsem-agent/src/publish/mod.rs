//! Published ports (`capsem -p`), the guest's side: inside a VM the agent
//! listens on vsock port [`PORT_PUBLISH`]; capsem-process connects to it
//! through vhost-device-vsock (`CONNECT 5008`) once per client of a
//! published port, and sends one [`HostToPublish::Open`] naming the guest
//! port. The agent dials 127.0.0.1:PORT in the guest, answers
//! [`PublishToHost::Opened`], and when connected relays the bytes both
//! ways (`crate::relay`, [`Ends::First`]) until either side ends.
//!
//! Only the host's CID is served (a guest process reaching the listener
//! through vsock loopback is closed at once), the request is read exactly
//! within [`HEADER_WAIT`] and must carry the session token, and a bad
//! request or a refused dial closes the connection. `lo` is brought up
//! first: without `--net` nothing else does, and 127.0.0.1 would be
//! unreachable.
//!
//! Threads: `publish` accepts (polling the stop signal and the listener);
//! each connection runs on its own `publish-conn` thread, at most
//! [`MAX_CONNS`] at once (more are closed). [`PublishService`] owns them:
//! its drop triggers the stop and joins the accept thread, which joins
//! every connection thread.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use capsem_proto::frame::{PublishGuest, LEN_PREFIX};
use capsem_proto::guest::{HOST_CID, PORT_PUBLISH};
use capsem_proto::publish::{bounded_reason, HostToPublish, PublishToHost, MAX_PUBLISH_FRAME};
use capsem_proto::{Codec, FrameError};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, VsockAddr};
use tracing::{debug, info, warn};

use crate::fdio::{self, Blocking};
use crate::relay::Ends;
use crate::stop::StopSignal;
use crate::transport::{self, Connected, Transport};

/// Connections relayed at once; more are closed.
pub const MAX_CONNS: usize = 128;
/// How long the host may take to send its request.
pub const HEADER_WAIT: Duration = Duration::from_secs(5);
/// Pending connections the kernel holds for the accept thread.
const BACKLOG: i32 = 64;
/// `VMADDR_CID_ANY`: listen on the guest's own CID, whatever it is.
const CID_ANY: u32 = u32::MAX;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot listen on vsock port {PORT_PUBLISH}")]
    Listen(#[source] nix::Error),
    #[error("cannot bring up lo")]
    Loopback(#[source] io::Error),
    #[error("cannot create the stop signal")]
    Stop(#[source] crate::stop::StopError),
    #[error("cannot start the publish thread")]
    Thread(#[source] io::Error),
}

/// Why one connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("a connection from CID {0}, not the host")]
    NotHost(u32),
    #[error("cannot read the request")]
    Read(#[source] io::Error),
    #[error("a request of {0} bytes (1 to {MAX_PUBLISH_FRAME})")]
    Length(usize),
    #[error("invalid request")]
    Frame(#[source] FrameError),
    #[error(transparent)]
    Token(#[from] capsem_proto::guest::HelloError),
    #[error("cannot answer")]
    Write(#[source] io::Error),
    #[error("the relay failed")]
    Relay(#[source] io::Error),
}

/// The listener and its accept thread, running.
#[derive(Debug)]
pub struct PublishService {
    stop: Arc<StopSignal>,
    thread: Option<JoinHandle<()>>,
}

impl PublishService {
    /// Starts the service inside a VM (the vsock transport); with a Unix
    /// transport (`--vmm none`, which refuses `-p`) there is none. A
    /// failure is logged: the VM runs without published ports.
    pub fn in_vm(transport: &Transport, token: &str) -> Option<Self> {
        if *transport != Transport::Vsock {
            return None;
        }
        match Self::start(token) {
            Ok(s) => {
                info!("publish: listening on vsock port {PORT_PUBLISH}");
                Some(s)
            }
            Err(e) => {
                warn!("published ports unavailable: {}", crate::session::chain(&e));
                None
            }
        }
    }

    fn start(token: &str) -> Result<Self, PublishError> {
        loopback_up().map_err(PublishError::Loopback)?;
        let listener = socket::socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(PublishError::Listen)?;
        socket::bind(listener.as_raw_fd(), &VsockAddr::new(CID_ANY, PORT_PUBLISH))
            .map_err(PublishError::Listen)?;
        let backlog = socket::Backlog::new(BACKLOG).map_err(PublishError::Listen)?;
        socket::listen(&listener, backlog).map_err(PublishError::Listen)?;
        let stop = Arc::new(StopSignal::new().map_err(PublishError::Stop)?);
        let (s, token) = (stop.clone(), token.to_owned());
        let thread = std::thread::Builder::new()
            .name("publish".into())
            .spawn(move || serve(&listener, &token, &s))
            .map_err(PublishError::Thread)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for PublishService {
    fn drop(&mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts until `stop`; every connection thread is joined before it returns.
fn serve(listener: &OwnedFd, token: &str, stop: &Arc<StopSignal>) {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let mut fds = [
            fdio::pollfd(stop.fd(), fdio::IN),
            fdio::pollfd(listener.as_fd(), fdio::IN),
        ];
        if let Err(e) = fdio::poll(&mut fds, None) {
            warn!("publish: poll failed: {e}");
            break;
        }
        if fdio::ready(&fds[0]) {
            break;
        }
        let fd = match socket::accept4(
            listener.as_raw_fd(),
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        ) {
            // SAFETY: accept4 just returned this new fd; nothing else owns it.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
            Err(nix::errno::Errno::EAGAIN) => continue,
            Err(e) => {
                warn!("publish: accept failed: {e}");
                // EMFILE and the like: wait for the stop or the next try.
                let mut fds = [fdio::pollfd(stop.fd(), fdio::IN)];
                let _ = fdio::poll(&mut fds, Some(Instant::now() + Duration::from_millis(100)));
                continue;
            }
        };
        conns.retain(|h| !h.is_finished());
        if conns.len() >= MAX_CONNS {
            warn!("publish: {MAX_CONNS} connections in progress; closing a new one");
            continue;
        }
        let (token, stop) = (token.to_owned(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("publish-conn".into())
            .spawn(move || {
                if let Err(e) = connection(&fd, &token, &stop) {
                    debug!("publish: connection ended: {}", crate::session::chain(&e));
                }
            });
        match spawned {
            Ok(h) => conns.push(h),
            Err(e) => warn!("publish: cannot start a connection thread: {e}"),
        }
    }
    stop.trigger();
    for h in conns {
        let _ = h.join();
    }
}

/// One host connection: the request, the dial, the answer, the relay.
fn connection(vsock: &OwnedFd, token: &str, stop: &StopSignal) -> Result<(), ConnError> {
    let peer: VsockAddr =
        socket::getpeername(vsock.as_raw_fd()).map_err(|e| ConnError::Read(io::Error::from(e)))?;
    if peer.cid() != HOST_CID {
        return Err(ConnError::NotHost(peer.cid()));
    }
    let deadline = Some(Instant::now() + HEADER_WAIT);
    let mut io = Blocking::new(vsock.as_fd(), stop.fd()).until(deadline);
    let HostToPublish::Open { token: got, port } = read_request(&mut io)?;
    capsem_proto::guest::check_token(&got, token)?;
    let server = dial(port, stop.fd());
    let answer = match &server {
        Ok(_) => PublishToHost::Opened {
            connected: true,
            reason: String::new(),
        },
        Err(reason) => {
            info!("publish: guest port {port}: {reason}");
            PublishToHost::Opened {
                connected: false,
                reason: bounded_reason(reason.clone()),
            }
        }
    };
    let frame = Codec::<PublishGuest>::encode(&answer).map_err(ConnError::Frame)?;
    io.write_all(&frame).map_err(ConnError::Write)?;
    match server {
        Ok(server) => crate::relay::relay(vsock.as_fd(), server.as_fd(), stop.fd(), Ends::First)
            .map_err(ConnError::Relay),
        Err(_) => Ok(()),
    }
}

/// Reads exactly one frame: nothing after it is consumed.
fn read_request(io: &mut Blocking<'_>) -> Result<HostToPublish, ConnError> {
    let mut prefix = [0u8; LEN_PREFIX];
    io.read_exact(&mut prefix).map_err(ConnError::Read)?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len == 0 || len > MAX_PUBLISH_FRAME {
        return Err(ConnError::Length(len));
    }
    let mut whole = vec![0u8; LEN_PREFIX + len];
    whole[..LEN_PREFIX].copy_from_slice(&prefix);
    io.read_exact(&mut whole[LEN_PREFIX..])
        .map_err(ConnError::Read)?;
    let mut codec = Codec::<PublishGuest>::new();
    codec.feed(&whole).map_err(ConnError::Frame)?;
    codec
        .next_message()
        .map_err(ConnError::Frame)?
        .ok_or(ConnError::Length(len))
}

/// Dials 127.0.0.1:`port` (bounded, cancelled by the stop); the reason
/// in words when it does not connect.
fn dial(port: u16, stop: BorrowedFd<'_>) -> Result<OwnedFd, String> {
    let addr = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    let endpoint = format!("127.0.0.1:{port}");
    match transport::connect_stream(AddressFamily::Inet, &addr, &endpoint, stop) {
        Ok(Connected::Socket(fd)) => Ok(fd),
        Ok(Connected::Cancelled) => Err("stopped".into()),
        Err(e) => Err(crate::session::chain(&e)),
    }
}

/// Sets `IFF_UP` on `lo` (the kernel gives it 127.0.0.1/8 as it comes up).
fn loopback_up() -> io::Result<()> {
    let sock = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of the
    // ifreq we own and point to, on a socket we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS just filled the union's flags member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the name and flags of the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn stop() -> StopSignal {
        StopSignal::new().unwrap()
    }

    fn nonblocking_pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (a, b)
    }

    #[test]
    fn reads_exactly_one_request() {
        let (ours, mut host) = nonblocking_pair();
        let frame = Codec::<capsem_proto::frame::PublishHost>::encode(&HostToPublish::Open {
            token: "tok".into(),
            port: 8000,
        })
        .unwrap();
        host.write_all(&frame).unwrap();
        host.write_all(b"GET / HTTP/1.0\r\n").unwrap();
        let s = stop();
        let mut io = Blocking::new(ours.as_fd(), s.fd()).until(Some(Instant::now() + HEADER_WAIT));
        let got = read_request(&mut io).unwrap();
        assert_eq!(
            got,
            HostToPublish::Open {
                token: "tok".into(),
                port: 8000
            }
        );
        // The relayed bytes after it are still there.
        let mut rest = [0u8; 16];
        io.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"GET / HTTP/1.0\r\n");
    }

    #[test]
    fn oversized_garbage_and_silent_requests_are_refused() {
        let s = stop();
        let (ours, mut host) = nonblocking_pair();
        host.write_all(&(MAX_PUBLISH_FRAME as u32 + 1).to_be_bytes())
            .unwrap();
        let mut io = Blocking::new(ours.as_fd(), s.fd());
        assert!(matches!(read_request(&mut io), Err(ConnError::Length(_))));
        let (ours, mut host) = nonblocking_pair();
        host.write_all(&[0, 0, 0, 2, 0xc1, 0xc1]).unwrap();
        let mut io = Blocking::new(ours.as_fd(), s.fd());
        assert!(matches!(read_request(&mut io), Err(ConnError::Frame(_))));
        let (ours, _host) = nonblocking_pair();
        let mut io = Blocking::new(ours.as_fd(), s.fd())
            .until(Some(Instant::now() + Duration::from_millis(50)));
        assert!(matches!(read_request(&mut io), Err(ConnError::Read(_))));
    }

    #[test]
    fn dial_connects_or_says_why() {
        let s = stop();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(dial(port, s.fd()).is_ok());
        drop(listener);
        let reason = dial(port, s.fd()).unwrap_err();
        assert!(reason.contains("refused"), "{reason}");
    }
}
