//! How the agent reaches the host: AF_VSOCK to CID 2 inside a VM, or the Unix
//! sockets `PATH_<port>` that vhost-device-vsock (and capsem-process with
//! `--vmm none`) listen on.
//!
//! Connecting is nonblocking and waits in a poll that also watches a cancel fd
//! (the termination signalfd), so a signal is never stuck behind a connect.

use std::ffi::OsString;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    self, getsockopt, sockopt, AddressFamily, SockFlag, SockType, SockaddrLike, UnixAddr, VsockAddr,
};

use crate::fdio;

/// How long one connect may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors connecting to the host.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("transport must be `vsock` or `unix:PATH`, got {0:?}")]
    Parse(String),
    #[error("invalid socket address {endpoint}")]
    Address {
        endpoint: String,
        #[source]
        source: Errno,
    },
    #[error("cannot create a socket for {endpoint}")]
    Socket {
        endpoint: String,
        #[source]
        source: Errno,
    },
    #[error("cannot connect to {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: Errno,
    },
    #[error("connecting to {endpoint} timed out")]
    Timeout { endpoint: String },
    #[error("waiting for the connection to {endpoint} failed")]
    Poll {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the host is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// AF_VSOCK to [`capsem_proto::guest::HOST_CID`].
    Vsock,
    /// Unix stream sockets `PATH_<port>`.
    Unix(PathBuf),
}

/// Result of a connect that a cancel fd may interrupt.
#[derive(Debug)]
pub enum Connected {
    /// A connected, nonblocking, close-on-exec stream socket.
    Socket(OwnedFd),
    /// The cancel fd became readable first.
    Cancelled,
}

impl FromStr for Transport {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "vsock" {
            return Ok(Self::Vsock);
        }
        match s.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(Self::Unix(PathBuf::from(path))),
            _ => Err(TransportError::Parse(s.to_owned())),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock => write!(f, "vsock"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Transport {
    /// The Unix socket path for `port`: `PATH_<port>`.
    pub fn unix_path(base: &std::path::Path, port: u32) -> PathBuf {
        let mut name = OsString::from(base.as_os_str());
        name.push(format!("_{port}"));
        PathBuf::from(name)
    }

    /// Human-readable endpoint for logs.
    pub fn endpoint(&self, port: u32) -> String {
        match self {
            Self::Vsock => format!("vsock:{}:{port}", capsem_proto::guest::HOST_CID),
            Self::Unix(base) => Self::unix_path(base, port).display().to_string(),
        }
    }

    /// Connects to `port`, giving up at [`CONNECT_TIMEOUT`] or when `cancel`
    /// becomes readable.
    pub fn connect(&self, port: u32, cancel: BorrowedFd<'_>) -> Result<Connected, TransportError> {
        let endpoint = self.endpoint(port);
        match self {
            Self::Vsock => {
                let addr = VsockAddr::new(capsem_proto::guest::HOST_CID, port);
                connect_stream(AddressFamily::Vsock, &addr, &endpoint, cancel)
            }
            Self::Unix(base) => {
                let path = Self::unix_path(base, port);
                let addr = UnixAddr::new(&path).map_err(|source| TransportError::Address {
                    endpoint: endpoint.clone(),
                    source,
                })?;
                connect_stream(AddressFamily::Unix, &addr, &endpoint, cancel)
            }
        }
    }
}

/// A nonblocking connect to `addr` (any family), bounded by
/// [`CONNECT_TIMEOUT`] and cancelled by `cancel`; `endpoint` names it in errors.
pub(crate) fn connect_stream(
    family: AddressFamily,
    addr: &dyn SockaddrLike,
    endpoint: &str,
    cancel: BorrowedFd<'_>,
) -> Result<Connected, TransportError> {
    let fd = socket::socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(|source| TransportError::Socket {
        endpoint: endpoint.to_owned(),
        source,
    })?;
    match socket::connect(fd.as_raw_fd(), addr) {
        Ok(()) => return Ok(Connected::Socket(fd)),
        Err(Errno::EINPROGRESS) => {}
        Err(source) => {
            return Err(TransportError::Connect {
                endpoint: endpoint.to_owned(),
                source,
            })
        }
    }
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut fds = [
        fdio::pollfd(cancel, fdio::IN),
        fdio::pollfd(fd.as_fd(), fdio::OUT),
    ];
    let n = fdio::poll(&mut fds, Some(deadline)).map_err(|source| TransportError::Poll {
        endpoint: endpoint.to_owned(),
        source,
    })?;
    if fdio::ready(&fds[0]) {
        return Ok(Connected::Cancelled);
    }
    if n == 0 {
        return Err(TransportError::Timeout {
            endpoint: endpoint.to_owned(),
        });
    }
    let err = getsockopt(&fd, sockopt::SocketError).map_err(|source| TransportError::Connect {
        endpoint: endpoint.to_owned(),
        source,
    })?;
    if err != 0 {
        return Err(TransportError::Connect {
            endpoint: endpoint.to_owned(),
            source: Errno::from_raw(err),
        });
    }
    Ok(Connected::Socket(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn parses_both_forms_and_rejects_others() {
        assert_eq!("vsock".parse::<Transport>().unwrap(), Transport::Vsock);
        assert_eq!(
            "unix:/tmp/x/vsock.sock".parse::<Transport>().unwrap(),
            Transport::Unix(PathBuf::from("/tmp/x/vsock.sock"))
        );
        assert!("unix:".parse::<Transport>().is_err());
        assert!("tcp:1".parse::<Transport>().is_err());
    }

    #[test]
    fn unix_ports_are_path_suffixes() {
        let t: Transport = "unix:/d/vsock.sock".parse().unwrap();
        assert_eq!(t.endpoint(5000), "/d/vsock.sock_5000");
        assert_eq!(t.endpoint(5001), "/d/vsock.sock_5001");
    }

    #[test]
    fn connects_to_a_unix_listener_and_fails_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("vsock.sock");
        let t = Transport::Unix(base.clone());
        let (cancel, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            t.connect(5000, cancel.as_fd()),
            Err(TransportError::Connect { .. })
        ));
        let _l = UnixListener::bind(Transport::unix_path(&base, 5000)).unwrap();
        assert!(matches!(
            t.connect(5000, cancel.as_fd()).unwrap(),
            Connected::Socket(_)
        ));
    }
}
