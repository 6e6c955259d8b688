//! The shared harness of the fuzz targets: an input is a chunking spec and
//! a byte stream; the stream is fed to a role's [`Codec`] in those chunks,
//! every message is drained, and the decoder's invariants are checked.
//!
//! Input layout: `k = (data[0] & 7) + 1` size bytes follow `data[0]`, then
//! the stream. Chunk `i` has the size given by size byte `i % k`
//! ([`chunk_size`]): small, medium, large, or the whole rest.
//!
//! Invariants, each a panic (a crash for libFuzzer) when broken:
//!
//! * nothing panics inside capsem-proto;
//! * a declared length over the role's bound is refused by the `feed` that
//!   completes its prefix (`TooLong`), so what is buffered stays under one
//!   frame: after every `feed` and drain, `buffered() < 4 + MAX_INBOUND`;
//! * the decoder agrees with a shadow copy of the stream parsed frame by
//!   frame with [`frame::parse`]: the same messages, the same bytes used,
//!   the same bytes left over;
//! * every decoded message, re-encoded by the peer's role, decodes to an
//!   equal value (unless the named re-encoding is over the bound: a peer
//!   may send structs as arrays, which are smaller).

use std::fmt::Debug;

use capsem_proto::frame::{self, Role, LEN_PREFIX};
use capsem_proto::{Codec, FrameError};

/// The chunk size a size byte stands for.
pub fn chunk_size(b: u8) -> usize {
    let n = usize::from(b & 0x3f) + 1;
    match b >> 6 {
        0 => n,
        1 => n * 61,
        2 => n * 4093,
        _ => usize::MAX,
    }
}

/// Splits an input into its chunk sizes and its stream.
pub fn split(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&head, rest)) = data.split_first() else {
        return (vec![usize::MAX], &[]);
    };
    let k = usize::from(head & 7) + 1;
    let k = k.min(rest.len());
    let sizes = rest[..k].iter().map(|&b| chunk_size(b)).collect::<Vec<_>>();
    let sizes = if sizes.is_empty() {
        vec![usize::MAX]
    } else {
        sizes
    };
    (sizes, &rest[k..])
}

/// Feeds `data`'s stream to a `Codec<R>` and checks the invariants; `P` is
/// the peer role (its outbound type is `R`'s inbound), used to re-encode.
/// `each` sees every decoded message (for the checks the host runs next).
pub fn drive<R, P>(data: &[u8], mut each: impl FnMut(&R::Inbound))
where
    R: Role,
    P: Role<Outbound = R::Inbound>,
    R::Inbound: PartialEq + Debug,
{
    let (sizes, stream) = split(data);
    let mut codec = Codec::<R>::new();
    // Everything fed, and where the shadow parse is in it.
    let mut shadow: Vec<u8> = Vec::new();
    let mut at = 0usize;
    let mut rest = stream;
    let mut i = 0usize;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].min(rest.len());
        i += 1;
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        shadow.extend_from_slice(chunk);
        if let Err(e) = codec.feed(chunk) {
            check_refusal::<R>(&e, &shadow[at..]);
            return;
        }
        loop {
            match codec.next_message() {
                Ok(Some(msg)) => {
                    let (want, used) =
                        match frame::parse::<R::Inbound>(&shadow[at..], R::MAX_INBOUND) {
                            Ok(Some(parsed)) => parsed,
                            other => panic!("decoder gave {msg:?}, shadow parse {other:?}"),
                        };
                    assert_eq!(msg, want, "decoder and shadow parse disagree");
                    at += used;
                    round_trip::<R, P>(&msg);
                    each(&msg);
                }
                Ok(None) => break,
                // The host drops the connection on an invalid frame.
                Err(_) => return,
            }
        }
        assert_eq!(
            codec.buffered(),
            shadow.len() - at,
            "buffered bytes differ from the undecoded rest"
        );
        assert!(
            codec.buffered() < LEN_PREFIX + R::MAX_INBOUND,
            "{} bytes buffered, over one frame",
            codec.buffered()
        );
    }
    // The end of the stream: clean only when nothing is left undecoded.
    assert_eq!(codec.finish().is_ok(), codec.buffered() == 0);
}

/// A refused `feed`: only a bad length prefix can refuse, and only a
/// prefix that really is over the bound or zero.
fn check_refusal<R: Role>(e: &FrameError, pending: &[u8]) {
    let declared = pending
        .get(..LEN_PREFIX)
        .map(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize);
    match e {
        FrameError::TooLong { len, max } => {
            assert_eq!(*max, R::MAX_INBOUND);
            assert!(*len > *max);
            assert_eq!(declared, Some(*len));
        }
        FrameError::Empty => assert_eq!(declared, Some(0)),
        other => panic!("feed refused with {other:?}"),
    }
}

/// Re-encodes `msg` as its sender would and decodes it again.
fn round_trip<R, P>(msg: &R::Inbound)
where
    R: Role,
    P: Role<Outbound = R::Inbound>,
    R::Inbound: PartialEq + Debug,
{
    let frame = match Codec::<P>::encode(msg) {
        Ok(f) => f,
        Err(FrameError::TooLong { .. }) => return,
        Err(e) => panic!("cannot re-encode {msg:?}: {e:?}"),
    };
    let mut again = Codec::<R>::new();
    again.feed(&frame).expect("a re-encoded frame is accepted");
    let back = again
        .next_message()
        .expect("a re-encoded frame decodes")
        .expect("a whole frame");
    assert_eq!(&back, msg, "round trip changed the message");
    assert_eq!(again.buffered(), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(chunk_size(0), 1);
        assert_eq!(chunk_size(0x3f), 64);
        assert_eq!(chunk_size(0x40), 61);
        assert_eq!(chunk_size(0xff), usize::MAX);
        let (s, rest) = split(&[1, 0, 0xff, 9, 9]);
        assert_eq!(s, [1, usize::MAX]);
        assert_eq!(rest, [9, 9]);
    }
}
