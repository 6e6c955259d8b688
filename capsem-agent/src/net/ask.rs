//! The agent's questions to the host on the network port: one connection
//! each, the question written and the answer read exactly (a length prefix,
//! then that many bytes), so no relayed byte is taken for framing; every
//! wait is bounded and watches the stop signal.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use capsem_proto::frame::{NetGuest, LEN_PREFIX};
use capsem_proto::guest::PORT_NET;
use capsem_proto::net::{HostToNet, NetToHost, MAX_NET_FRAME};
use capsem_proto::{Codec, FrameError};

use crate::fdio::Blocking;
use crate::transport::{Connected, Transport, TransportError};

#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error(transparent)]
    Connect(#[from] TransportError),
    #[error("stopped")]
    Stopped,
    #[error("cannot encode the question")]
    Encode(#[source] FrameError),
    #[error("the host's answer failed")]
    Io(#[source] std::io::Error),
    #[error("an answer of {0} bytes (1 to {MAX_NET_FRAME})")]
    Length(usize),
    #[error("invalid answer")]
    Frame(#[source] FrameError),
}

/// Where and as whom the agent asks.
#[derive(Debug, Clone)]
pub struct Host {
    pub transport: Transport,
    pub token: String,
}

impl Host {
    /// Sends `question` and reads the answer within `wait`; the connection
    /// comes back with it (a `Connect`'s relay goes on over it).
    pub fn ask(
        &self,
        question: &NetToHost,
        stop: BorrowedFd<'_>,
        wait: Duration,
    ) -> Result<(OwnedFd, HostToNet), AskError> {
        let fd = match self.transport.connect(PORT_NET, stop)? {
            Connected::Socket(fd) => fd,
            Connected::Cancelled => return Err(AskError::Stopped),
        };
        let deadline = Some(Instant::now() + wait);
        let mut io = Blocking::new(fd.as_fd(), stop).until(deadline);
        let frame = Codec::<NetGuest>::encode(question).map_err(AskError::Encode)?;
        io.write_all(&frame).map_err(AskError::Io)?;
        let mut prefix = [0u8; LEN_PREFIX];
        io.read_exact(&mut prefix).map_err(AskError::Io)?;
        let len = u32::from_be_bytes(prefix) as usize;
        if len == 0 || len > MAX_NET_FRAME {
            return Err(AskError::Length(len));
        }
        let mut whole = vec![0u8; LEN_PREFIX + len];
        whole[..LEN_PREFIX].copy_from_slice(&prefix);
        io.read_exact(&mut whole[LEN_PREFIX..])
            .map_err(AskError::Io)?;
        let mut codec = Codec::<NetGuest>::new();
        codec.feed(&whole).map_err(AskError::Frame)?;
        let answer = codec
            .next_message()
            .map_err(AskError::Frame)?
            .ok_or(AskError::Length(len))?;
        Ok((fd, answer))
    }
}
