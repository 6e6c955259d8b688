//! The control connection's opening: the hello/ack handshake, and the boot
//! stage report parsed from `$CAPSEM_BOOT_STAGES`.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use capsem_proto::conn::{ConnError, FrameReader};
use capsem_proto::frame::Guest;
use capsem_proto::guest::{
    BootStage, GuestToHost, HostToGuest, MAX_BOOT_STAGES, MAX_STAGE_NAME, PROTOCOL_VERSION,
};
use capsem_proto::{Codec, FrameError};

use crate::fdio::{self, Blocking, Written};

/// How long the host has to answer a hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the handshake and of the boot stage list.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control connection I/O failed")]
    Io(#[source] io::Error),
    #[error("invalid control frame")]
    Frame(#[source] FrameError),
    #[error("the host closed the control connection before acknowledging the hello")]
    Closed,
    #[error("no hello acknowledgement within {0:?}")]
    Timeout(Duration),
    #[error("expected a hello acknowledgement, got {0}")]
    Unexpected(&'static str),
    #[error("host speaks protocol version {got}, the agent {want}")]
    Version { got: u16, want: u16 },
    #[error("boot stage {0:?} is not name=micros")]
    StageSyntax(String),
    #[error("boot stage name {0:?} is empty or longer than {MAX_STAGE_NAME} bytes")]
    StageName(String),
    #[error("more than {MAX_BOOT_STAGES} boot stages")]
    TooManyStages,
}

/// How a handshake ended without an error.
#[derive(Debug)]
pub enum Handshake {
    /// The host acknowledged; `codec` holds any bytes it sent after the ack.
    Acked {
        generation: u64,
        codec: Codec<Guest>,
    },
    /// The cancel fd became readable.
    Cancelled,
}

/// Sends `hello` on the nonblocking `control` socket and waits for the
/// `HelloAck`, at most `timeout`, or until `cancel` is readable.
pub fn handshake(
    control: BorrowedFd<'_>,
    hello: &GuestToHost,
    cancel: BorrowedFd<'_>,
    timeout: Duration,
) -> Result<Handshake, ControlError> {
    let frame = Codec::<Guest>::encode(hello).map_err(ControlError::Frame)?;
    if let Written::Cancelled { .. } =
        fdio::write_all(control, &frame, cancel).map_err(ControlError::Io)?
    {
        return Ok(Handshake::Cancelled);
    }
    let io = Blocking::new(control, cancel).until(Some(Instant::now() + timeout));
    let mut frames = FrameReader::<Guest, _>::new(io);
    let msg = match frames.read_frame() {
        Ok(Some(msg)) => msg,
        Ok(None) => return Err(ControlError::Closed),
        Err(ConnError::Frame(e)) => return Err(ControlError::Frame(e)),
        Err(ConnError::Io(e)) if fdio::is_cancelled(&e) => return Ok(Handshake::Cancelled),
        Err(ConnError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
            return Err(ControlError::Timeout(timeout))
        }
        Err(ConnError::Io(e)) => return Err(ControlError::Io(e)),
    };
    match msg {
        HostToGuest::HelloAck {
            version,
            generation,
        } if version == PROTOCOL_VERSION => Ok(Handshake::Acked {
            generation,
            codec: frames.into_parts().1,
        }),
        HostToGuest::HelloAck { version, .. } => Err(ControlError::Version {
            got: version,
            want: PROTOCOL_VERSION,
        }),
        HostToGuest::Ping { .. } => Err(ControlError::Unexpected("ping")),
        HostToGuest::Resize { .. } => Err(ControlError::Unexpected("resize")),
        HostToGuest::Shutdown => Err(ControlError::Unexpected("shutdown")),
    }
}

/// Parses `name=micros,name=micros` (empty input: no stages). Names are
/// non-empty, at most [`MAX_STAGE_NAME`] bytes; at most [`MAX_BOOT_STAGES`]
/// stages.
pub fn parse_boot_stages(s: &str) -> Result<Vec<BootStage>, ControlError> {
    let mut stages = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        if stages.len() == MAX_BOOT_STAGES {
            return Err(ControlError::TooManyStages);
        }
        let (name, micros) = item
            .split_once('=')
            .ok_or_else(|| ControlError::StageSyntax(truncated(item)))?;
        if name.is_empty() || name.len() > MAX_STAGE_NAME {
            return Err(ControlError::StageName(truncated(name)));
        }
        let micros = micros
            .parse::<u64>()
            .map_err(|_| ControlError::StageSyntax(truncated(item)))?;
        stages.push(BootStage {
            name: name.to_owned(),
            micros,
        });
    }
    Ok(stages)
}

/// Bounded copy of untrusted text for an error message.
fn truncated(s: &str) -> String {
    s.chars().take(MAX_STAGE_NAME + 16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsem_proto::frame::Host;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn boot_stages_parse() {
        assert_eq!(parse_boot_stages("").unwrap(), vec![]);
        assert_eq!(
            parse_boot_stages("kernel=1200,modules=34000, agent=50000").unwrap(),
            vec![
                BootStage {
                    name: "kernel".into(),
                    micros: 1200
                },
                BootStage {
                    name: "modules".into(),
                    micros: 34000
                },
                BootStage {
                    name: "agent".into(),
                    micros: 50000
                },
            ]
        );
    }

    #[test]
    fn boot_stages_reject_bad_input() {
        assert!(matches!(
            parse_boot_stages("kernel"),
            Err(ControlError::StageSyntax(_))
        ));
        assert!(matches!(
            parse_boot_stages("kernel=-1"),
            Err(ControlError::StageSyntax(_))
        ));
        assert!(matches!(
            parse_boot_stages("=5"),
            Err(ControlError::StageName(_))
        ));
        let long = format!("{}=1", "n".repeat(MAX_STAGE_NAME + 1));
        assert!(matches!(
            parse_boot_stages(&long),
            Err(ControlError::StageName(_))
        ));
        let exact = format!("{}=1", "n".repeat(MAX_STAGE_NAME));
        assert_eq!(parse_boot_stages(&exact).unwrap().len(), 1);
        let many: Vec<String> = (0..=MAX_BOOT_STAGES).map(|i| format!("s{i}={i}")).collect();
        assert!(matches!(
            parse_boot_stages(&many.join(",")),
            Err(ControlError::TooManyStages)
        ));
        assert_eq!(
            parse_boot_stages(&many[..MAX_BOOT_STAGES].join(","))
                .unwrap()
                .len(),
            MAX_BOOT_STAGES
        );
    }

    fn hello() -> GuestToHost {
        GuestToHost::Hello {
            version: PROTOCOL_VERSION,
            token: "t".into(),
            connects: 1,
            shell_pid: 1,
        }
    }

    #[test]
    fn handshake_returns_the_generation_and_keeps_later_bytes() {
        let (agent, mut host) = UnixStream::pair().unwrap();
        fdio::set_nonblocking(agent.as_fd()).unwrap();
        let (cancel, _keep) = UnixStream::pair().unwrap();
        let mut out = Codec::<Host>::encode(&HostToGuest::HelloAck {
            version: PROTOCOL_VERSION,
            generation: 9,
        })
        .unwrap();
        Codec::<Host>::encode_into(&HostToGuest::Ping { seq: 3 }, &mut out).unwrap();
        host.write_all(&out).unwrap();
        let got = handshake(agent.as_fd(), &hello(), cancel.as_fd(), HELLO_TIMEOUT).unwrap();
        let Handshake::Acked {
            generation,
            mut codec,
        } = got
        else {
            panic!("not acked: {got:?}");
        };
        assert_eq!(generation, 9);
        assert_eq!(
            codec.next_message().unwrap(),
            Some(HostToGuest::Ping { seq: 3 })
        );
        let mut hc = Codec::<Host>::new();
        let mut buf = [0u8; 256];
        let n = host.read(&mut buf).unwrap();
        hc.feed(&buf[..n]).unwrap();
        assert_eq!(hc.next_message().unwrap(), Some(hello()));
    }

    #[test]
    fn handshake_fails_on_close_timeout_and_other_messages() {
        let (cancel, _keep) = UnixStream::pair().unwrap();

        let (agent, host) = UnixStream::pair().unwrap();
        fdio::set_nonblocking(agent.as_fd()).unwrap();
        drop(host);
        assert!(handshake(agent.as_fd(), &hello(), cancel.as_fd(), HELLO_TIMEOUT).is_err());

        let (agent, _host) = UnixStream::pair().unwrap();
        fdio::set_nonblocking(agent.as_fd()).unwrap();
        assert!(matches!(
            handshake(
                agent.as_fd(),
                &hello(),
                cancel.as_fd(),
                Duration::from_millis(20)
            ),
            Err(ControlError::Timeout(_))
        ));

        let (agent, mut host) = UnixStream::pair().unwrap();
        fdio::set_nonblocking(agent.as_fd()).unwrap();
        host.write_all(&Codec::<Host>::encode(&HostToGuest::Shutdown).unwrap())
            .unwrap();
        assert!(matches!(
            handshake(agent.as_fd(), &hello(), cancel.as_fd(), HELLO_TIMEOUT),
            Err(ControlError::Unexpected("shutdown"))
        ));
    }
}
