//! The framing alone (`frame::parse` with any payload, any bound): a
//! length over the bound is refused from its four bytes, whatever follows;
//! a whole frame uses exactly prefix + declared length.
#![no_main]

use capsem_proto::frame::{self, LEN_PREFIX};
use capsem_proto::FrameError;
use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;

fuzz_target!(|data: &[u8]| {
    let Some((bound, buf)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max = usize::from(u16::from_be_bytes(*bound));
    let declared = buf
        .get(..LEN_PREFIX)
        .map(|p| u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize);
    match frame::parse::<IgnoredAny>(buf, max) {
        Ok(Some((_, used))) => {
            let len = declared.expect("a frame has a prefix");
            assert!(len > 0 && len <= max);
            assert_eq!(used, LEN_PREFIX + len);
        }
        Ok(None) => {
            if let Some(len) = declared {
                assert!(len > 0 && len <= max, "{len} over {max} not refused");
                assert!(buf.len() < LEN_PREFIX + len);
            }
        }
        Err(FrameError::TooLong { len, max: m }) => {
            assert_eq!(m, max);
            assert_eq!(Some(len), declared);
            assert!(len > max);
        }
        Err(FrameError::Empty) => assert_eq!(declared, Some(0)),
        Err(FrameError::Invalid(_) | FrameError::TrailingBytes { .. }) => {
            let len = declared.expect("a payload has a prefix");
            assert!(buf.len() >= LEN_PREFIX + len);
        }
        Err(e) => panic!("parse failed with {e:?}"),
    }
});
