//! Host <-> guest messages on the terminal port ([`crate::guest::PORT_TERMINAL`]).
//!
//! After its control hello was acknowledged with generation `N`, the agent
//! connects the terminal port and sends [`TermToHost::Hello`] with the
//! session token and `N`; the host pairs the connection with generation `N`
//! only if both match (constant-time token compare), and closes it
//! otherwise. Then the guest sends the shell's output as
//! [`TermToHost::Output`] chunks, in order, and, once the shell exited, its
//! PTY was drained and the shell was reaped, exactly one
//! [`TermToHost::Exit`]: the last frame on the connection. The host sends
//! the user's keystrokes as [`HostToTerm::Input`].
//!
//! Output and status travel on one stream, so every output byte precedes
//! the status by construction. The host forwards only the payloads of
//! `Output` to the user's terminal; no frame byte ever reaches it.

use serde::{Deserialize, Serialize};

use crate::guest::{check_token, HelloError};

/// Largest output or input chunk in one message (well under the 64 KiB
/// frame limit).
pub const MAX_TERM_CHUNK: usize = 32 * 1024;

/// Messages the guest sends on the terminal port. The host decodes only these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum TermToHost {
    /// First message on every terminal connection.
    Hello {
        token: String,
        /// The generation the host acknowledged on the control port.
        generation: u64,
    },
    /// Bytes the shell wrote to its terminal.
    Output {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The shell ended; sent after every `Output`, the last message.
    Exit {
        /// Exit code when the shell exited normally.
        exit_code: Option<i32>,
        /// Signal number when a signal killed it.
        signal: Option<i32>,
    },
}

/// Messages the host sends on the terminal port. The guest decodes only these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum HostToTerm {
    /// Bytes for the shell's terminal (the user's keystrokes).
    Input {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

impl TermToHost {
    /// The variant's wire tag, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Output { .. } => "output",
            Self::Exit { .. } => "exit",
        }
    }

    /// Checks that this is a hello with our token; returns its generation.
    pub fn check_hello(&self, expected_token: &str) -> Result<u64, HelloError> {
        match self {
            Self::Hello { token, generation } => {
                check_token(token, expected_token)?;
                Ok(*generation)
            }
            other => Err(HelloError::NotHello(other.kind())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Codec, TermGuest, TermHost};
    use proptest::prelude::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn guest_goldens() -> Vec<(TermToHost, &'static str)> {
        vec![
            (
                TermToHost::Hello {
                    token: "ab".into(),
                    generation: 2,
                },
                "0000002182a174a568656c6c6fa16382a5746f6b656ea26162aa67656e65726174696f6e02",
            ),
            (
                TermToHost::Output {
                    data: vec![0x24, 0x20],
                },
                "0000001682a174a66f7574707574a16381a464617461c4022420",
            ),
            (
                TermToHost::Exit {
                    exit_code: Some(3),
                    signal: None,
                },
                "0000001e82a174a465786974a16382a9657869745f636f646503a67369676e616cc0",
            ),
            (
                TermToHost::Exit {
                    exit_code: None,
                    signal: Some(9),
                },
                "0000001e82a174a465786974a16382a9657869745f636f6465c0a67369676e616c09",
            ),
        ]
    }

    fn host_goldens() -> Vec<(HostToTerm, &'static str)> {
        vec![(
            HostToTerm::Input {
                data: b"ls\r".to_vec(),
            },
            "0000001682a174a5696e707574a16381a464617461c4036c730d",
        )]
    }

    #[test]
    fn terminal_golden_vectors() {
        for (msg, want) in guest_goldens() {
            let got = Codec::<TermGuest>::encode(&msg).unwrap();
            assert_eq!(hex(&got), want, "{msg:?}");
            let mut host = Codec::<TermHost>::new();
            host.feed(&got).unwrap();
            assert_eq!(host.next_message().unwrap(), Some(msg));
        }
        for (msg, want) in host_goldens() {
            let got = Codec::<TermHost>::encode(&msg).unwrap();
            assert_eq!(hex(&got), want, "{msg:?}");
            let mut guest = Codec::<TermGuest>::new();
            guest.feed(&got).unwrap();
            assert_eq!(guest.next_message().unwrap(), Some(msg));
        }
    }

    #[test]
    fn hello_checks() {
        let hello = |token: &str| TermToHost::Hello {
            token: token.into(),
            generation: 4,
        };
        assert_eq!(hello("tok").check_hello("tok"), Ok(4));
        assert_eq!(hello("tak").check_hello("tok"), Err(HelloError::WrongToken));
        let out = TermToHost::Output { data: Vec::new() };
        assert_eq!(out.check_hello("tok"), Err(HelloError::NotHello("output")));
    }

    #[test]
    fn largest_chunk_fits_a_frame() {
        let data = vec![0xff; MAX_TERM_CHUNK];
        Codec::<TermGuest>::encode(&TermToHost::Output { data: data.clone() }).unwrap();
        Codec::<TermHost>::encode(&HostToTerm::Input { data }).unwrap();
    }

    #[test]
    fn host_rejects_its_own_messages() {
        // A guest reflecting the host's input back gets an invalid frame.
        let frame = Codec::<TermHost>::encode(&HostToTerm::Input { data: vec![1] }).unwrap();
        let mut host = Codec::<TermHost>::new();
        host.feed(&frame).unwrap();
        assert!(host.next_message().is_err());
    }

    proptest! {
        #[test]
        fn output_round_trips(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let msg = TermToHost::Output { data };
            let frame = Codec::<TermGuest>::encode(&msg).unwrap();
            let mut host = Codec::<TermHost>::new();
            host.feed(&frame).unwrap();
            prop_assert_eq!(host.next_message().unwrap(), Some(msg));
            host.finish().unwrap();
        }
    }
}
