//! CLI <-> capsem-process messages on `<vm-dir>/ctl.sock`.
//!
//! A client connects, sends [`ClientToProcess::Attach`] (or a one-shot
//! request such as [`ClientToProcess::Status`]), and then exchanges terminal
//! bytes. For one session the process sends, in this order: `Attached`, any
//! number of `Output`, then exactly one of `ShellExited` (every output byte
//! of the shell came before it) or `SessionLost`.

use serde::{Deserialize, Serialize};

use crate::exec::ExecStream;

/// Largest IPC payload either side accepts.
pub const MAX_IPC_FRAME: usize = 1024 * 1024;
/// Largest terminal chunk carried in one `Input` or `Output`.
pub const MAX_IPC_CHUNK: usize = 64 * 1024;

/// Requests from the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum ClientToProcess {
    /// Attach this connection to the shell's terminal.
    Attach { cols: u16, rows: u16 },
    /// Keystrokes for the shell.
    Input {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The client's terminal changed size.
    Resize { cols: u16, rows: u16 },
    /// Ask for a [`ProcessToClient::Status`] answer.
    Status,
    /// Destroy the VM: end the shell, stop the guest, exit.
    Shutdown,
    /// Test hook: close the current guest connections as if the transport
    /// broke, so the agent must reconnect.
    DropGuestConnections,
    /// Run one command (a VM started with `--exec`): attaches this
    /// connection like `Attach` and forwards the command to the guest. The
    /// process answers `Attached`, then `ExecOutput`* and exactly one of
    /// `ExecExit` (after every output byte) or `SessionLost`.
    Exec {
        argv: Vec<String>,
        env: Vec<(String, String)>,
        workdir: Option<String>,
        timeout_ms: Option<u64>,
        /// `-t`: run on a PTY of this size (`cols`, `rows`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tty: Option<(u16, u16)>,
    },
    /// Bytes for the command's stdin (at most `MAX_EXEC_CHUNK`).
    ExecStdin {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The command's stdin ends.
    ExecStdinEof,
    /// Signal the command's process group.
    ExecSignal { signal: i32 },
}

/// What the process reports about its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub vm_id: String,
    /// Generation of the current guest connection pair (0 before the first).
    pub generation: u64,
    /// The agent's own count of connections, from its latest hello.
    pub agent_connects: u64,
    /// Host pid of the agent (no-VM backend) or of the VMM.
    pub guest_pid: Option<u32>,
    /// The shell's pid inside the guest, from the latest hello.
    pub shell_pid: Option<u32>,
    /// Whether a client is attached.
    pub attached: bool,
    /// Whether a control and a terminal connection are both being served.
    pub bridged: bool,
}

/// Messages to the CLI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum ProcessToClient {
    /// The attach was accepted.
    Attached { vm_id: String },
    /// Shell output, in order.
    Output {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The shell ended; no `Output` follows.
    ShellExited {
        exit_code: Option<i32>,
        signal: Option<i32>,
    },
    /// The session ended without an exit status.
    SessionLost { reason: String },
    /// The guest missed `missed_pongs` heartbeats in a row.
    GuestUnresponsive { missed_pongs: u32 },
    /// The guest answers heartbeats again.
    GuestResponsive,
    /// Answer to [`ClientToProcess::Status`].
    Status(VmStatus),
    /// A request was refused.
    Error { message: String },
    /// Output of an `Exec` command, in order per stream.
    ExecOutput {
        stream: ExecStream,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The `Exec` command ended; no `ExecOutput` follows.
    ExecExit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Client, Codec, Process};
    use proptest::prelude::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn golden_vectors() {
        let client: Vec<(ClientToProcess, &str)> = vec![
            (
                ClientToProcess::Attach { cols: 80, rows: 24 },
                "0000001982a174a6617474616368a16382a4636f6c7350a4726f777318",
            ),
            (
                ClientToProcess::Input {
                    data: b"ls\r".to_vec(),
                },
                "0000001682a174a5696e707574a16381a464617461c4036c730d",
            ),
            (
                ClientToProcess::Resize {
                    cols: 100,
                    rows: 40,
                },
                "0000001982a174a6726573697a65a16382a4636f6c7364a4726f777328",
            ),
            (ClientToProcess::Status, "0000000a81a174a6737461747573"),
            (
                ClientToProcess::Shutdown,
                "0000000c81a174a873687574646f776e",
            ),
            (
                ClientToProcess::DropGuestConnections,
                "0000001a81a174b664726f705f67756573745f636f6e6e656374696f6e73",
            ),
            (
                ClientToProcess::Exec {
                    argv: vec!["true".into()],
                    env: vec![],
                    workdir: Some("/tmp".into()),
                    timeout_ms: None,
                    tty: None,
                },
                "0000003482a174a465786563a16384a46172677691a474727565a3656e7690a7776f726b646972a42f746d70aa74696d656f75745f6d73c0",
            ),
            (
                ClientToProcess::ExecStdin {
                    data: b"x".to_vec(),
                },
                "0000001982a174aa657865635f737464696ea16381a464617461c40178",
            ),
            (ClientToProcess::ExecStdinEof, "0000001281a174ae657865635f737464696e5f656f66"),
            (ClientToProcess::ExecSignal { signal: 2 }, "0000001a82a174ab657865635f7369676e616ca16381a67369676e616c02"),
        ];
        for (msg, want) in client {
            let got = Codec::<Client>::encode(&msg).unwrap();
            assert_eq!(hex(&got), want.replace(char::is_whitespace, ""), "{msg:?}");
            let mut process = Codec::<Process>::new();
            process.feed(&got).unwrap();
            assert_eq!(process.next_message().unwrap(), Some(msg));
        }
        let process: Vec<(ProcessToClient, &str)> = vec![
            (
                ProcessToClient::Attached {
                    vm_id: "tmp-1".into(),
                },
                "0000001b82a174a86174746163686564a16381a5766d5f6964a5746d702d31",
            ),
            (
                ProcessToClient::Output {
                    data: b"$ ".to_vec(),
                },
                "0000001682a174a66f7574707574a16381a464617461c4022420",
            ),
            (
                ProcessToClient::ShellExited {
                    exit_code: Some(0),
                    signal: None,
                },
                "0000002682a174ac7368656c6c5f657869746564a16382a9657869745f636f646500a673\
                69676e616cc0",
            ),
            (
                ProcessToClient::SessionLost {
                    reason: "agent died".into(),
                },
                "0000002582a174ac73657373696f6e5f6c6f7374a16381a6726561736f6eaa6167656e74\
                2064696564",
            ),
            (
                ProcessToClient::GuestUnresponsive { missed_pongs: 3 },
                "0000002782a174b267756573745f756e726573706f6e73697665a16381ac6d6973736564\
                5f706f6e677303",
            ),
            (
                ProcessToClient::GuestResponsive,
                "0000001481a174b067756573745f726573706f6e73697665",
            ),
            (
                ProcessToClient::Status(VmStatus {
                    vm_id: "tmp-1".into(),
                    generation: 1,
                    agent_connects: 1,
                    guest_pid: Some(100),
                    shell_pid: None,
                    attached: true,
                    bridged: true,
                }),
                "0000005e82a174a6737461747573a16387a5766d5f6964a5746d702d31aa67656e657261\
                74696f6e01ae6167656e745f636f6e6e6563747301a967756573745f70696464a9736865\
                6c6c5f706964c0a86174746163686564c3a762726964676564c3",
            ),
            (
                ProcessToClient::Error {
                    message: "busy".into(),
                },
                "0000001982a174a56572726f72a16381a76d657373616765a462757379",
            ),
            (
                ProcessToClient::ExecOutput {
                    stream: ExecStream::Stdout,
                    data: b"hi".to_vec(),
                },
                "0000002982a174ab657865635f6f7574707574a16382a673747265616da67374646f7574a464617461c4026869",
            ),
            (
                ProcessToClient::ExecExit {
                    exit_code: Some(5),
                    signal: None,
                    timed_out: false,
                },
                "0000002e82a174a9657865635f65786974a16383a9657869745f636f646505a67369676e616cc0a974696d65645f6f7574c2",
            ),
        ];
        for (msg, want) in process {
            let got = Codec::<Process>::encode(&msg).unwrap();
            assert_eq!(hex(&got), want.replace(char::is_whitespace, ""), "{msg:?}");
            let mut client = Codec::<Client>::new();
            client.feed(&got).unwrap();
            assert_eq!(client.next_message().unwrap(), Some(msg));
        }
    }

    #[test]
    fn a_full_output_chunk_fits_in_a_frame() {
        let msg = ProcessToClient::Output {
            data: vec![0xff; MAX_IPC_CHUNK],
        };
        let frame = Codec::<Process>::encode(&msg).unwrap();
        assert!(frame.len() < MAX_IPC_FRAME);
    }

    proptest! {
        #[test]
        fn output_round_trips(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let msg = ProcessToClient::Output { data };
            let frame = Codec::<Process>::encode(&msg).unwrap();
            let mut client = Codec::<Client>::new();
            client.feed(&frame).unwrap();
            prop_assert_eq!(client.next_message().unwrap(), Some(msg));
        }

        #[test]
        fn input_round_trips(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let msg = ClientToProcess::Input { data };
            let frame = Codec::<Client>::encode(&msg).unwrap();
            let mut process = Codec::<Process>::new();
            process.feed(&frame).unwrap();
            prop_assert_eq!(process.next_message().unwrap(), Some(msg));
        }
    }
}
