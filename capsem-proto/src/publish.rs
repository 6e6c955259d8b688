//! Host -> guest messages on the publish port ([`crate::guest::PORT_PUBLISH`]):
//! one connection per client of a published port (`capsem -p`), opened by
//! the host through vhost-device-vsock's `CONNECT <port>` to the agent's
//! listener in the guest.
//!
//! A connection carries one request, then the relayed bytes:
//!
//! * [`HostToPublish::Open`], the host's first frame: the session token and
//!   the guest port to dial on the guest's 127.0.0.1.
//! * [`PublishToHost::Opened`], the agent's answer once the dial ended:
//!   connected, or why not (then the agent closes).
//!
//! Before the first frame, the host's connection to vhost-device-vsock's
//! Unix socket does the hybrid-vsock handshake: the host writes
//! [`connect_line`] (`CONNECT 5008\n`) and reads one line back,
//! `OK <local port>\n` ([`parse_ok_line`], at most [`MAX_OK_LINE`] bytes)
//! once the agent accepted; a refusal is the socket closing instead.
//!
//! Connected, the connection carries the raw bytes of the host client's
//! TCP connection both ways. Each frame is read exactly (length prefix,
//! then that many bytes), so no relayed byte is ever taken for framing;
//! frames are at most [`MAX_PUBLISH_FRAME`], the reason at most
//! [`MAX_PUBLISH_REASON`] bytes.

use serde::{Deserialize, Serialize};

/// Largest publish-port frame either side accepts.
pub const MAX_PUBLISH_FRAME: usize = 512;
/// Longest refusal reason carried.
pub const MAX_PUBLISH_REASON: usize = 255;
/// Longest hybrid-vsock `OK` line read, newline included.
pub const MAX_OK_LINE: usize = 32;

/// The hybrid-vsock request for the guest's vsock port `port`.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// The host-side port of an `OK <port>` line (without its newline), or
/// `None` for anything else.
pub fn parse_ok_line(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"OK ")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// What the host asks, once per connection. The guest decodes only these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum HostToPublish {
    /// Dial 127.0.0.1:`port` in the guest and relay this connection to it.
    Open { token: String, port: u16 },
}

/// The agent's answer. The host decodes only these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum PublishToHost {
    /// Whether the dial connected; `reason` says why not (empty when it did).
    Opened { connected: bool, reason: String },
}

impl PublishToHost {
    /// Whether every string is within the protocol's bounds.
    pub fn within_bounds(&self) -> bool {
        match self {
            Self::Opened { reason, .. } => reason.len() <= MAX_PUBLISH_REASON,
        }
    }
}

/// `reason` cut to [`MAX_PUBLISH_REASON`] bytes at a character boundary.
pub fn bounded_reason(mut reason: String) -> String {
    if reason.len() > MAX_PUBLISH_REASON {
        let mut end = MAX_PUBLISH_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{PublishGuest, PublishHost};
    use crate::Codec;

    #[test]
    fn round_trip_and_roles() {
        let open = HostToPublish::Open {
            token: "ab".into(),
            port: 8000,
        };
        let frame = Codec::<PublishHost>::encode(&open).unwrap();
        let mut guest = Codec::<PublishGuest>::new();
        guest.feed(&frame).unwrap();
        assert_eq!(guest.next_message().unwrap(), Some(open));
        let opened = PublishToHost::Opened {
            connected: false,
            reason: "connection refused".into(),
        };
        let frame = Codec::<PublishGuest>::encode(&opened).unwrap();
        let mut host = Codec::<PublishHost>::new();
        host.feed(&frame).unwrap();
        assert_eq!(host.next_message().unwrap(), Some(opened));
        // The host refuses its own message reflected back.
        let mut host = Codec::<PublishHost>::new();
        let reflected = Codec::<PublishHost>::encode(&HostToPublish::Open {
            token: "ab".into(),
            port: 1,
        })
        .unwrap();
        host.feed(&reflected).unwrap();
        assert!(host.next_message().is_err());
    }

    #[test]
    fn bounds() {
        let long = bounded_reason("é".repeat(MAX_PUBLISH_REASON));
        assert!(long.len() <= MAX_PUBLISH_REASON);
        let ok = PublishToHost::Opened {
            connected: false,
            reason: long,
        };
        assert!(ok.within_bounds());
        let over = PublishToHost::Opened {
            connected: false,
            reason: "x".repeat(MAX_PUBLISH_REASON + 1),
        };
        assert!(!over.within_bounds());
        let mut host = Codec::<PublishHost>::new();
        assert!(host
            .feed(&(MAX_PUBLISH_FRAME as u32 + 1).to_be_bytes())
            .is_err());
    }

    #[test]
    fn the_hybrid_handshake_lines() {
        assert_eq!(connect_line(5008), "CONNECT 5008\n");
        assert_eq!(parse_ok_line(b"OK 1025"), Some(1025));
        assert_eq!(parse_ok_line(b"OK 4294967295"), Some(u32::MAX));
        for bad in [
            &b"OK"[..],
            b"OK ",
            b"ok 1",
            b"OK -1",
            b"OK 1 ",
            b"OK 4294967296",
            b"OK 00000000001",
            b"ERR 1",
        ] {
            assert_eq!(
                parse_ok_line(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn golden_open() {
        let frame = Codec::<PublishHost>::encode(&HostToPublish::Open {
            token: "t".into(),
            port: 8000,
        })
        .unwrap();
        // {"t":"open","c":{"token":"t","port":8000}}
        assert_eq!(
            frame,
            b"\x00\x00\x00\x1b\x82\xa1t\xa4open\xa1c\x82\xa5token\xa1t\xa4port\xcd\x1f\x40"
                .to_vec()
        );
    }

    #[test]
    fn golden_opened() {
        let frame = Codec::<PublishGuest>::encode(&PublishToHost::Opened {
            connected: true,
            reason: String::new(),
        })
        .unwrap();
        // {"t":"opened","c":{"connected":true,"reason":""}}
        assert_eq!(
            frame,
            b"\x00\x00\x00\x20\x82\xa1t\xa6opened\xa1c\x82\xa9connected\xc3\xa6reason\xa0".to_vec()
        );
    }
}
