//! Length-prefixed framing: a 4-byte big-endian payload length, then a
//! MessagePack payload.
//!
//! The decoder is incremental and distinguishes three outcomes, as tokio's
//! mini-redis does: a whole message, "need more bytes" (`Ok(None)`), and
//! invalid bytes (`Err`). A length above the role's maximum is rejected as
//! soon as its four bytes arrive, before anything is buffered for it, and an
//! EOF in the middle of a frame is reported apart from a clean EOF.

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::audit::{AuditToHost, HostToAudit, MAX_AUDIT_FRAME};
use crate::exec::{ExecToHost, HostToExec};
use crate::guest::{GuestToHost, HostToGuest, MAX_CONTROL_FRAME};
use crate::ipc::{ClientToProcess, ProcessToClient, MAX_IPC_FRAME};
use crate::net::{HostToNet, NetToHost, MAX_NET_FRAME};
use crate::publish::{HostToPublish, PublishToHost, MAX_PUBLISH_FRAME};
use crate::terminal::{HostToTerm, TermToHost};

/// Bytes in the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Framing errors. `Incomplete` is not an error: it is `Ok(None)`.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {len} exceeds the maximum of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("zero-length frame")]
    Empty,
    #[error("invalid message payload")]
    Invalid(#[source] rmp_serde::decode::Error),
    #[error("message payload has {trailing} trailing bytes")]
    TrailingBytes { trailing: usize },
    #[error("connection closed inside a frame ({buffered} bytes buffered)")]
    TruncatedAtEof { buffered: usize },
    #[error("cannot encode message")]
    Encode(#[source] rmp_serde::encode::Error),
}

/// One side of a conversation: what it may receive and what it may send.
///
/// Decoding is only possible through [`Codec`], whose role fixes the inbound
/// type, so the host cannot decode a `HostToGuest` and the guest cannot decode
/// a `GuestToHost`.
pub trait Role {
    type Inbound: DeserializeOwned;
    type Outbound: Serialize;
    /// Largest inbound payload accepted.
    const MAX_INBOUND: usize;
    /// Largest outbound payload produced (the peer's `MAX_INBOUND`).
    const MAX_OUTBOUND: usize;
}

/// The host per-VM process, facing the guest agent.
#[derive(Debug)]
pub enum Host {}
/// The guest agent, facing the host.
#[derive(Debug)]
pub enum Guest {}
/// The host per-VM process on the exec port.
#[derive(Debug)]
pub enum ExecHost {}
/// The guest agent on the exec port.
#[derive(Debug)]
pub enum ExecGuest {}
/// The host per-VM process on the terminal port.
#[derive(Debug)]
pub enum TermHost {}
/// The guest agent on the terminal port.
#[derive(Debug)]
pub enum TermGuest {}
/// The host per-VM process on the audit port.
#[derive(Debug)]
pub enum AuditHost {}
/// The guest agent on the audit port.
#[derive(Debug)]
pub enum AuditGuest {}
/// The host per-VM process on the network port.
#[derive(Debug)]
pub enum NetHost {}
/// The guest agent on the network port.
#[derive(Debug)]
pub enum NetGuest {}
/// The host per-VM process on the publish port.
#[derive(Debug)]
pub enum PublishHost {}
/// The guest agent on the publish port.
#[derive(Debug)]
pub enum PublishGuest {}
/// The `capsem` CLI, facing capsem-process.
#[derive(Debug)]
pub enum Client {}
/// capsem-process, facing a CLI client.
#[derive(Debug)]
pub enum Process {}

impl Role for Host {
    type Inbound = GuestToHost;
    type Outbound = HostToGuest;
    const MAX_INBOUND: usize = MAX_CONTROL_FRAME;
    const MAX_OUTBOUND: usize = MAX_CONTROL_FRAME;
}
impl Role for Guest {
    type Inbound = HostToGuest;
    type Outbound = GuestToHost;
    const MAX_INBOUND: usize = MAX_CONTROL_FRAME;
    const MAX_OUTBOUND: usize = MAX_CONTROL_FRAME;
}
impl Role for ExecHost {
    type Inbound = ExecToHost;
    type Outbound = HostToExec;
    const MAX_INBOUND: usize = MAX_CONTROL_FRAME;
    const MAX_OUTBOUND: usize = MAX_CONTROL_FRAME;
}
impl Role for ExecGuest {
    type Inbound = HostToExec;
    type Outbound = ExecToHost;
    const MAX_INBOUND: usize = MAX_CONTROL_FRAME;
    const MAX_OUTBOUND: usize = MAX_CONTROL_FRAME;
}
impl Role for TermHost {
    type Inbound = TermToHost;
    type Outbound = HostToTerm;
    const MAX_INBOUND: usize = MAX_CONTROL_FRAME;
    const MAX_OUTBOUND: usize = MAX_CONTROL_FRAME;
}
impl Role for TermGuest {
    type Inbound = HostToTerm;
    type Outbound = TermToHost;
    const MAX_INBOUND: usize = MAX_CONTROL_FRAME;
    const MAX_OUTBOUND: usize = MAX_CONTROL_FRAME;
}
impl Role for AuditHost {
    type Inbound = AuditToHost;
    type Outbound = HostToAudit;
    const MAX_INBOUND: usize = MAX_AUDIT_FRAME;
    const MAX_OUTBOUND: usize = MAX_AUDIT_FRAME;
}
impl Role for AuditGuest {
    type Inbound = HostToAudit;
    type Outbound = AuditToHost;
    const MAX_INBOUND: usize = MAX_AUDIT_FRAME;
    const MAX_OUTBOUND: usize = MAX_AUDIT_FRAME;
}
impl Role for NetHost {
    type Inbound = NetToHost;
    type Outbound = HostToNet;
    const MAX_INBOUND: usize = MAX_NET_FRAME;
    const MAX_OUTBOUND: usize = MAX_NET_FRAME;
}
impl Role for NetGuest {
    type Inbound = HostToNet;
    type Outbound = NetToHost;
    const MAX_INBOUND: usize = MAX_NET_FRAME;
    const MAX_OUTBOUND: usize = MAX_NET_FRAME;
}
impl Role for PublishHost {
    type Inbound = PublishToHost;
    type Outbound = HostToPublish;
    const MAX_INBOUND: usize = MAX_PUBLISH_FRAME;
    const MAX_OUTBOUND: usize = MAX_PUBLISH_FRAME;
}
impl Role for PublishGuest {
    type Inbound = HostToPublish;
    type Outbound = PublishToHost;
    const MAX_INBOUND: usize = MAX_PUBLISH_FRAME;
    const MAX_OUTBOUND: usize = MAX_PUBLISH_FRAME;
}
impl Role for Client {
    type Inbound = ProcessToClient;
    type Outbound = ClientToProcess;
    const MAX_INBOUND: usize = MAX_IPC_FRAME;
    const MAX_OUTBOUND: usize = MAX_IPC_FRAME;
}
impl Role for Process {
    type Inbound = ClientToProcess;
    type Outbound = ProcessToClient;
    const MAX_INBOUND: usize = MAX_IPC_FRAME;
    const MAX_OUTBOUND: usize = MAX_IPC_FRAME;
}

/// Encodes one message as a complete frame (prefix and payload).
fn encode_frame<M: Serialize>(msg: &M, max: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    if let Err(e) = rmp_serde::encode::write_named(out, msg) {
        out.truncate(start);
        return Err(FrameError::Encode(e));
    }
    let len = out.len() - start - LEN_PREFIX;
    if len > max {
        out.truncate(start);
        return Err(FrameError::TooLong { len, max });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLong { len, max })?;
    out[start..start + LEN_PREFIX].copy_from_slice(&prefix.to_be_bytes());
    Ok(())
}

/// Reads the length prefix at the start of `buf`, if all four bytes are there,
/// and checks it against `max`.
fn payload_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let mut be = [0u8; LEN_PREFIX];
    be.copy_from_slice(prefix);
    let len = u32::from_be_bytes(be) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    Ok(Some(len))
}

/// Parses one frame from the front of `buf`.
///
/// `Ok(None)` means more bytes are needed; `Ok(Some((msg, n)))` means `n`
/// bytes were used.
pub fn parse<M: DeserializeOwned>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(M, usize)>, FrameError> {
    let Some(len) = payload_len(buf, max)? else {
        return Ok(None);
    };
    let Some(payload) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Ok(None);
    };
    let mut de = rmp_serde::Deserializer::new(payload);
    let msg = M::deserialize(&mut de).map_err(FrameError::Invalid)?;
    let rest = de.get_ref().len();
    if rest != 0 {
        return Err(FrameError::TrailingBytes { trailing: rest });
    }
    Ok(Some((msg, LEN_PREFIX + len)))
}

/// Incremental decoder over a byte stream.
#[derive(Debug)]
pub struct FrameDecoder<M> {
    buf: Vec<u8>,
    start: usize,
    max: usize,
    _msg: PhantomData<fn() -> M>,
}

impl<M: DeserializeOwned> FrameDecoder<M> {
    fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max,
            _msg: PhantomData,
        }
    }

    /// Appends bytes read from the stream. Fails as soon as a buffered length
    /// prefix is over the maximum, so a hostile peer cannot make us buffer a
    /// frame we will never accept.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
        payload_len(&self.buf[self.start..], self.max).map(|_| ())
    }

    /// The next whole message, `Ok(None)` when more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<M>, FrameError> {
        match parse(&self.buf[self.start..], self.max)? {
            Some((msg, used)) => {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                Ok(Some(msg))
            }
            None => Ok(None),
        }
    }

    /// Call at EOF: a clean EOF is `Ok`, an EOF inside a frame is an error.
    pub fn finish(&self) -> Result<(), FrameError> {
        let buffered = self.buf.len() - self.start;
        if buffered == 0 {
            Ok(())
        } else {
            Err(FrameError::TruncatedAtEof { buffered })
        }
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// The framing for one side of a conversation.
#[derive(Debug)]
pub struct Codec<R: Role> {
    decoder: FrameDecoder<R::Inbound>,
}

impl<R: Role> Default for Codec<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R: Role> Codec<R> {
    pub fn new() -> Self {
        Self {
            decoder: FrameDecoder::new(R::MAX_INBOUND),
        }
    }

    /// Encodes an outbound message as one frame.
    pub fn encode(msg: &R::Outbound) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        encode_frame(msg, R::MAX_OUTBOUND, &mut out)?;
        Ok(out)
    }

    /// Appends one encoded frame to `out`.
    pub fn encode_into(msg: &R::Outbound, out: &mut Vec<u8>) -> Result<(), FrameError> {
        encode_frame(msg, R::MAX_OUTBOUND, out)
    }

    /// See [`FrameDecoder::feed`].
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.decoder.feed(bytes)
    }

    /// See [`FrameDecoder::next_message`].
    pub fn next_message(&mut self) -> Result<Option<R::Inbound>, FrameError> {
        self.decoder.next_message()
    }

    /// See [`FrameDecoder::finish`].
    pub fn finish(&self) -> Result<(), FrameError> {
        self.decoder.finish()
    }

    /// See [`FrameDecoder::buffered`].
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn byte_at_a_time_yields_one_message() {
        let frame = Codec::<Host>::encode(&HostToGuest::Resize { cols: 80, rows: 24 }).unwrap();
        let mut guest = Codec::<Guest>::new();
        for (i, b) in frame.iter().enumerate() {
            guest.feed(&[*b]).unwrap();
            let got = guest.next_message().unwrap();
            if i + 1 < frame.len() {
                assert!(got.is_none(), "message before its last byte");
                assert!(guest.finish().is_err(), "EOF mid-frame must be an error");
            } else {
                assert_eq!(got, Some(HostToGuest::Resize { cols: 80, rows: 24 }));
            }
        }
        guest.finish().unwrap();
    }

    #[test]
    fn oversized_length_rejected_before_payload() {
        let mut host = Codec::<Host>::new();
        let len = (MAX_CONTROL_FRAME as u32 + 1).to_be_bytes();
        let err = host.feed(&len).unwrap_err();
        assert!(matches!(err, FrameError::TooLong { .. }), "{err:?}");
        // The prefix alone was buffered: nothing was reserved for the payload.
        assert!(host.decoder.buf.capacity() < 64);
    }

    #[test]
    fn zero_length_rejected() {
        let mut host = Codec::<Host>::new();
        assert!(matches!(host.feed(&[0, 0, 0, 0]), Err(FrameError::Empty)));
    }

    #[test]
    fn garbage_payload_is_invalid_not_incomplete() {
        let mut host = Codec::<Host>::new();
        host.feed(&[0, 0, 0, 3, 0xc1, 0xc1, 0xc1]).unwrap();
        assert!(matches!(host.next_message(), Err(FrameError::Invalid(_))));
    }

    #[test]
    fn host_rejects_a_host_to_guest_message() {
        // A hostile guest echoing host messages back gets an invalid frame.
        let frame = Codec::<Host>::encode(&HostToGuest::Shutdown).unwrap();
        let mut host = Codec::<Host>::new();
        host.feed(&frame).unwrap();
        assert!(matches!(host.next_message(), Err(FrameError::Invalid(_))));
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_invalid() {
        let mut frame = Codec::<Guest>::encode(&GuestToHost::Pong { seq: 1 }).unwrap();
        frame.push(0xc0);
        let len = (frame.len() - LEN_PREFIX) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let mut host = Codec::<Host>::new();
        host.feed(&frame).unwrap();
        assert!(matches!(
            host.next_message(),
            Err(FrameError::TrailingBytes { trailing: 1 })
        ));
    }

    #[test]
    fn several_frames_in_one_read() {
        let mut bytes = Vec::new();
        for seq in 0..10 {
            Codec::<Guest>::encode_into(&GuestToHost::Pong { seq }, &mut bytes).unwrap();
        }
        let mut host = Codec::<Host>::new();
        host.feed(&bytes).unwrap();
        for seq in 0..10 {
            assert_eq!(
                host.next_message().unwrap(),
                Some(GuestToHost::Pong { seq })
            );
        }
        assert_eq!(host.next_message().unwrap(), None);
        host.finish().unwrap();
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_host(chunks in proptest::collection::vec(
            proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut host = Codec::<Host>::new();
            'outer: for chunk in &chunks {
                if host.feed(chunk).is_err() { break; }
                loop {
                    match host.next_message() {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
            }
            let _ = host.finish();
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_guest_or_the_cli(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut guest = Codec::<Guest>::new();
            if guest.feed(&bytes).is_ok() {
                while let Ok(Some(_)) = guest.next_message() {}
            }
            let mut cli = Codec::<Client>::new();
            if cli.feed(&bytes).is_ok() {
                while let Ok(Some(_)) = cli.next_message() {}
            }
            let mut process = Codec::<Process>::new();
            if process.feed(&bytes).is_ok() {
                while let Ok(Some(_)) = process.next_message() {}
            }
        }

        #[test]
        fn arbitrary_length_prefix_with_valid_size_is_bounded(len in any::<u32>()) {
            let mut host = Codec::<Host>::new();
            match host.feed(&len.to_be_bytes()) {
                Ok(()) => prop_assert!(len as usize <= MAX_CONTROL_FRAME && len > 0),
                Err(FrameError::TooLong { .. }) => prop_assert!(len as usize > MAX_CONTROL_FRAME),
                Err(FrameError::Empty) => prop_assert_eq!(len, 0),
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }
    }
}
