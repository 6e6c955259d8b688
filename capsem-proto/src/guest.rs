//! Host <-> guest messages on the control port, the ports, and the limits.
//!
//! The guest connects to the host (vsock CID 2, or `<uds>_<port>` through
//! vhost-device-vsock). The control connection opens with
//! [`GuestToHost::Hello`], which the host answers with
//! [`HostToGuest::HelloAck`] or by closing the connection. Only after the ack
//! does the guest open the terminal connection ([`crate::terminal`]), which
//! opens with the token and the acknowledged generation and then carries the
//! shell's output chunks and, last, its exit status.
//!
//! New message kinds (exec, audit) are new variants behind a protocol version
//! bump: an unknown variant is an invalid frame and closes the connection.

use serde::{Deserialize, Serialize};

/// Protocol version exchanged in the hello. Peers must match exactly.
/// 2: the exec port ([`crate::exec`]) and `CAPSEM_MODE=exec`; an agent of
/// version 1 would start a shell where a command was asked for.
/// 3: the terminal port is framed ([`crate::terminal`]): output chunks then
/// the shell's exit status on one stream; `ShellExited` left the control
/// port, and exec mode opens no terminal connection.
pub const PROTOCOL_VERSION: u16 = 3;

/// Vsock CID of the host as seen from a guest.
pub const HOST_CID: u32 = 2;
/// Control messages (this module's enums), both directions.
pub const PORT_CONTROL: u32 = 5000;
/// The shell's terminal ([`crate::terminal`]), both directions.
pub const PORT_TERMINAL: u32 = 5001;
/// One non-interactive command's streams ([`crate::exec`]).
pub const PORT_EXEC: u32 = 5005;
/// Guest execve audit records ([`crate::audit`]).
pub const PORT_AUDIT: u32 = 5006;
/// The guest's egress questions and relayed connections ([`crate::net`]).
pub const PORT_NET: u32 = 5007;
/// The host's connections to published ports ([`crate::publish`]): the one
/// port the agent listens on, the host connecting (vhost-device-vsock's
/// `CONNECT`).
pub const PORT_PUBLISH: u32 = 5008;

/// Largest control payload either side accepts.
pub const MAX_CONTROL_FRAME: usize = 64 * 1024;
/// Largest session token accepted in a hello.
pub const MAX_TOKEN_LEN: usize = 128;
/// Largest number of boot stages accepted in one report.
pub const MAX_BOOT_STAGES: usize = 64;
/// Largest boot stage name accepted.
pub const MAX_STAGE_NAME: usize = 64;

/// One measured step of the guest's boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootStage {
    /// What finished, for example `modules` or `agent_connected`.
    pub name: String,
    /// Microseconds since the guest kernel started (CLOCK_BOOTTIME).
    pub micros: u64,
}

/// Messages the guest sends. The host decodes only these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum GuestToHost {
    /// First message on every control connection.
    Hello {
        version: u16,
        /// The per-boot token the host gave the agent at launch.
        token: String,
        /// How many times this agent has connected, this one included.
        connects: u64,
        /// The shell's pid inside the guest.
        shell_pid: u32,
    },
    /// Answer to [`HostToGuest::Ping`], on the control channel only.
    Pong { seq: u64 },
    /// Timings of the guest's boot stages (real VMs only).
    BootTimings { stages: Vec<BootStage> },
}

/// Messages the host sends. The guest decodes only these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum HostToGuest {
    /// The hello was accepted; `generation` numbers this connection pair.
    HelloAck { version: u16, generation: u64 },
    /// Heartbeat; the guest answers with the same `seq`.
    Ping { seq: u64 },
    /// The terminal's new size.
    Resize { cols: u16, rows: u16 },
    /// End the shell and stop (the VM powers off).
    Shutdown,
}

/// Why a hello was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("expected a hello as the first message, got {0}")]
    NotHello(&'static str),
    #[error("protocol version {got} is incompatible with {want}")]
    Version { got: u16, want: u16 },
    #[error("session token of {len} bytes is over the limit")]
    TokenTooLong { len: usize },
    #[error("wrong session token")]
    WrongToken,
}

impl GuestToHost {
    /// The variant's wire tag, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Pong { .. } => "pong",
            Self::BootTimings { .. } => "boot_timings",
        }
    }

    /// Checks that this is a hello with our version and token.
    pub fn check_hello(&self, expected_token: &str) -> Result<(), HelloError> {
        let Self::Hello { version, token, .. } = self else {
            return Err(HelloError::NotHello(self.kind()));
        };
        if *version != PROTOCOL_VERSION {
            return Err(HelloError::Version {
                got: *version,
                want: PROTOCOL_VERSION,
            });
        }
        check_token(token, expected_token)
    }
}

/// Checks a session token a guest presented (in a control, exec or audit
/// hello): bounded length, constant-time compare.
pub fn check_token(got: &str, expected: &str) -> Result<(), HelloError> {
    if got.len() > MAX_TOKEN_LEN {
        return Err(HelloError::TokenTooLong { len: got.len() });
    }
    if !constant_time_eq(got.as_bytes(), expected.as_bytes()) {
        return Err(HelloError::WrongToken);
    }
    Ok(())
}

/// Compares without an early exit, so timing does not reveal a prefix match.
/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Codec, Guest, Host};
    use proptest::prelude::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Golden vectors: the exact frames, prefix included. `docs/protocol.md`
    /// shows the same bytes; a change here is a protocol change.
    fn guest_goldens() -> Vec<(GuestToHost, &'static str)> {
        vec![
            (
                GuestToHost::Hello {
                    version: 1,
                    token: "0123abcd".into(),
                    connects: 1,
                    shell_pid: 42,
                },
                "0000003982a174a568656c6c6fa16384a776657273696f6e01a5746f6b656ea830313233\
                 61626364a8636f6e6e6563747301a97368656c6c5f7069642a",
            ),
            (
                GuestToHost::Pong { seq: 7 },
                "0000001082a174a4706f6e67a16381a373657107",
            ),
            (
                GuestToHost::BootTimings {
                    stages: vec![BootStage {
                        name: "init".into(),
                        micros: 1000,
                    }],
                },
                "0000003082a174ac626f6f745f74696d696e6773a16381a67374616765739182a46e616d\
                 65a4696e6974a66d6963726f73cd03e8",
            ),
        ]
    }

    fn host_goldens() -> Vec<(HostToGuest, &'static str)> {
        vec![
            (
                HostToGuest::HelloAck {
                    version: 1,
                    generation: 2,
                },
                "0000002582a174a968656c6c6f5f61636ba16382a776657273696f6e01aa67656e657261\
                 74696f6e02",
            ),
            (
                HostToGuest::Ping { seq: 7 },
                "0000001082a174a470696e67a16381a373657107",
            ),
            (
                HostToGuest::Resize { cols: 80, rows: 24 },
                "0000001982a174a6726573697a65a16382a4636f6c7350a4726f777318",
            ),
            (HostToGuest::Shutdown, "0000000c81a174a873687574646f776e"),
        ]
    }

    #[test]
    fn guest_to_host_golden_vectors() {
        for (msg, want) in guest_goldens() {
            let got = Codec::<Guest>::encode(&msg).unwrap();
            assert_eq!(hex(&got), want.replace(char::is_whitespace, ""), "{msg:?}");
            let mut host = Codec::<Host>::new();
            host.feed(&got).unwrap();
            assert_eq!(host.next_message().unwrap(), Some(msg));
        }
    }

    #[test]
    fn host_to_guest_golden_vectors() {
        for (msg, want) in host_goldens() {
            let got = Codec::<Host>::encode(&msg).unwrap();
            assert_eq!(hex(&got), want.replace(char::is_whitespace, ""), "{msg:?}");
            let mut guest = Codec::<Guest>::new();
            guest.feed(&got).unwrap();
            assert_eq!(guest.next_message().unwrap(), Some(msg));
        }
    }

    #[test]
    fn hello_checks() {
        let hello = |version, token: &str| GuestToHost::Hello {
            version,
            token: token.into(),
            connects: 1,
            shell_pid: 1,
        };
        assert_eq!(hello(PROTOCOL_VERSION, "tok").check_hello("tok"), Ok(()));
        assert_eq!(
            hello(PROTOCOL_VERSION, "tok").check_hello("tak"),
            Err(HelloError::WrongToken)
        );
        assert_eq!(
            hello(PROTOCOL_VERSION, "to").check_hello("tok"),
            Err(HelloError::WrongToken)
        );
        assert_eq!(
            hello(PROTOCOL_VERSION + 1, "tok").check_hello("tok"),
            Err(HelloError::Version {
                got: PROTOCOL_VERSION + 1,
                want: PROTOCOL_VERSION
            })
        );
        let long = "x".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(
            hello(PROTOCOL_VERSION, &long).check_hello(&long),
            Err(HelloError::TokenTooLong { .. })
        ));
        assert_eq!(
            GuestToHost::Pong { seq: 1 }.check_hello("tok"),
            Err(HelloError::NotHello("pong"))
        );
    }

    fn any_guest_to_host() -> impl Strategy<Value = GuestToHost> {
        prop_oneof![
            (any::<u16>(), "[ -~]{0,128}", any::<u64>(), any::<u32>()).prop_map(
                |(version, token, connects, shell_pid)| GuestToHost::Hello {
                    version,
                    token,
                    connects,
                    shell_pid
                }
            ),
            any::<u64>().prop_map(|seq| GuestToHost::Pong { seq }),
            proptest::collection::vec(("[a-z_]{0,32}", any::<u64>()), 0..8).prop_map(|v| {
                GuestToHost::BootTimings {
                    stages: v
                        .into_iter()
                        .map(|(name, micros)| BootStage { name, micros })
                        .collect(),
                }
            }),
        ]
    }

    fn any_host_to_guest() -> impl Strategy<Value = HostToGuest> {
        prop_oneof![
            (any::<u16>(), any::<u64>()).prop_map(|(version, generation)| HostToGuest::HelloAck {
                version,
                generation
            }),
            any::<u64>().prop_map(|seq| HostToGuest::Ping { seq }),
            (any::<u16>(), any::<u16>())
                .prop_map(|(cols, rows)| HostToGuest::Resize { cols, rows }),
            Just(HostToGuest::Shutdown),
        ]
    }

    proptest! {
        #[test]
        fn guest_to_host_round_trips(msg in any_guest_to_host()) {
            let frame = Codec::<Guest>::encode(&msg).unwrap();
            let mut host = Codec::<Host>::new();
            host.feed(&frame).unwrap();
            prop_assert_eq!(host.next_message().unwrap(), Some(msg));
            host.finish().unwrap();
        }

        #[test]
        fn host_to_guest_round_trips(msg in any_host_to_guest()) {
            let frame = Codec::<Host>::encode(&msg).unwrap();
            let mut guest = Codec::<Guest>::new();
            guest.feed(&frame).unwrap();
            prop_assert_eq!(guest.next_message().unwrap(), Some(msg));
            guest.finish().unwrap();
        }
    }
}
