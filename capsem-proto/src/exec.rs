//! Host <-> guest messages on the exec port ([`crate::guest::PORT_EXEC`]):
//! one non-interactive command per connection, with its three standard
//! streams as pipes (never a PTY, never the terminal channel).
//!
//! The agent connects to the exec port and sends [`ExecToHost::Hello`] with
//! the session token: in exec mode (`CAPSEM_MODE=exec`, `capsem run`) once,
//! after its control hello was acknowledged; in a persistent VM it keeps one
//! idle exec connection open and opens the next as soon as one is given a
//! command, so `capsem exec` runs many commands at once, each on its own
//! connection and in its own process group. The host sends exactly one
//! [`HostToExec::Start`], then any number of `Stdin`, at most one `StdinEof`
//! and any `Signal`. The guest sends `Output` chunks in the order the command
//! wrote them and then exactly one [`ExecToHost::Exit`]; nothing follows it.
//! Because both travel on the one exec connection, every output byte reaches
//! the host before the status; `Exit` also carries the byte counts per stream
//! so the host can check it.
//!
//! Every list and string is bounded ([`check_start`]), and the same checks
//! run in the CLI (to fail early with exit 125) and in the agent (the guest
//! trusts nothing either).

use serde::{Deserialize, Serialize};

/// Largest number of arguments, the program included.
pub const MAX_EXEC_ARGS: usize = 1024;
/// Largest argument, in bytes.
pub const MAX_EXEC_ARG_LEN: usize = 8 * 1024;
/// Largest number of environment variables given by the user.
pub const MAX_EXEC_ENV: usize = 256;
/// Largest environment variable name, in bytes.
pub const MAX_ENV_NAME: usize = 128;
/// Largest environment variable value, in bytes.
pub const MAX_ENV_VALUE: usize = 8 * 1024;
/// Largest working directory path, in bytes.
pub const MAX_WORKDIR: usize = 4096;
/// Largest stdin/stdout/stderr chunk in one message (well under the 64 KiB
/// frame limit).
pub const MAX_EXEC_CHUNK: usize = 32 * 1024;
/// Largest `Start` request: the arguments, environment and working
/// directory together, so the encoded message always fits in one frame.
pub const MAX_START_BYTES: usize = 56 * 1024;
/// Largest timeout: one week.
pub const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

/// Names the guest refuses to set: they change how shells, the dynamic
/// loader or interpreters behave before the command's own code runs.
pub const DENIED_ENV: &[&str] = &[
    "BASH_ENV",
    "ENV",
    "IFS",
    "PROMPT_COMMAND",
    "PS4",
    "SHELLOPTS",
    "BASHOPTS",
    "CDPATH",
    "GLOBIGNORE",
    "PERL5OPT",
    "PERL5LIB",
    "PERLLIB",
    "PYTHONSTARTUP",
    "PYTHONINSPECT",
    "NODE_OPTIONS",
    "RUBYOPT",
    "GCONV_PATH",
    "GLIBC_TUNABLES",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "RES_OPTIONS",
    "TMPDIR",
    "MALLOC_CHECK_",
];
/// Name prefixes the guest refuses (`LD_PRELOAD`, `BASH_FUNC_x%%`...).
pub const DENIED_ENV_PREFIXES: &[&str] = &["LD_", "BASH_FUNC_", "MALLOC_"];

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecStream {
    Stdout,
    Stderr,
}

/// Messages the host sends on the exec port. The guest decodes only these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum HostToExec {
    /// Run `argv[0]` (looked up in `PATH`) with `argv`, the base environment
    /// plus `env`, in `workdir` (default: the agent's working directory),
    /// killed after `timeout_ms`.
    Start {
        argv: Vec<String>,
        env: Vec<(String, String)>,
        workdir: Option<String>,
        timeout_ms: Option<u64>,
        /// Run on a PTY of this size (`cols`, `rows`) instead of pipes:
        /// one output stream (`stdout`), stdin's EOF sent as Ctrl-D.
        /// Absent on the wire when `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tty: Option<(u16, u16)>,
    },
    /// Bytes for the command's stdin.
    Stdin {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Close the command's stdin.
    StdinEof,
    /// Send `signal` to the command's process group; a SIGTERM is followed
    /// by SIGKILL after a grace period.
    Signal { signal: i32 },
}

/// Messages the guest sends on the exec port. The host decodes only these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum ExecToHost {
    /// First message on every exec connection: the session token. The host
    /// closes a connection whose first message is anything else.
    Hello { token: String },
    /// Bytes the command wrote, in order per stream.
    Output {
        stream: ExecStream,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The command ended (or could not start: exit code 127 not found, 126
    /// not executable, with the reason sent on stderr first). The last
    /// message on the connection.
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        /// The timeout expired and the agent killed the command.
        timed_out: bool,
        /// Bytes sent in `Output{stream: stdout}` messages in all.
        stdout_bytes: u64,
        /// Bytes sent in `Output{stream: stderr}` messages in all.
        stderr_bytes: u64,
    },
}

impl ExecToHost {
    /// The variant's wire tag, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Output { .. } => "output",
            Self::Exit { .. } => "exit",
        }
    }
}

/// Why a command or an environment variable was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    #[error("no command given")]
    NoCommand,
    #[error("more than {MAX_EXEC_ARGS} arguments")]
    TooManyArgs,
    #[error("an argument is longer than {MAX_EXEC_ARG_LEN} bytes")]
    ArgTooLong,
    #[error("an argument contains a NUL byte")]
    ArgNul,
    #[error("more than {MAX_EXEC_ENV} environment variables")]
    TooManyEnv,
    #[error("invalid environment variable name {0:?}: expected [A-Za-z_][A-Za-z0-9_]*, at most {MAX_ENV_NAME} bytes")]
    EnvName(String),
    #[error("environment variable {0} is not allowed (it changes how programs start)")]
    EnvDenied(String),
    #[error("the value of environment variable {0} is longer than {MAX_ENV_VALUE} bytes or contains a NUL byte")]
    EnvValue(String),
    #[error(
        "invalid working directory: empty, longer than {MAX_WORKDIR} bytes, or contains a NUL byte"
    )]
    Workdir,
    #[error("timeout must be 1 to {MAX_TIMEOUT_MS} ms")]
    Timeout,
    #[error(
        "the command, its arguments and environment are over {MAX_START_BYTES} bytes together"
    )]
    TooLarge,
}

/// A name for logs and errors that cannot flood a terminal.
fn shown(name: &str) -> String {
    name.chars().take(MAX_ENV_NAME).collect()
}

/// Checks one environment variable name: the syntax, then the deny list.
pub fn check_env_name(name: &str) -> Result<(), ExecError> {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok
        || name.len() > MAX_ENV_NAME
        || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(ExecError::EnvName(shown(name)));
    }
    let upper = name.to_ascii_uppercase();
    if DENIED_ENV.contains(&upper.as_str())
        || DENIED_ENV_PREFIXES.iter().any(|p| upper.starts_with(p))
    {
        return Err(ExecError::EnvDenied(shown(name)));
    }
    Ok(())
}

/// Checks one `NAME=value` pair.
pub fn check_env(name: &str, value: &str) -> Result<(), ExecError> {
    check_env_name(name)?;
    if value.len() > MAX_ENV_VALUE || value.contains('\0') {
        return Err(ExecError::EnvValue(shown(name)));
    }
    Ok(())
}

/// Checks every bound of a `Start` request.
pub fn check_start(
    argv: &[String],
    env: &[(String, String)],
    workdir: Option<&str>,
    timeout_ms: Option<u64>,
) -> Result<(), ExecError> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(ExecError::NoCommand);
    }
    if argv.len() > MAX_EXEC_ARGS {
        return Err(ExecError::TooManyArgs);
    }
    for arg in argv {
        if arg.len() > MAX_EXEC_ARG_LEN {
            return Err(ExecError::ArgTooLong);
        }
        if arg.contains('\0') {
            return Err(ExecError::ArgNul);
        }
    }
    if env.len() > MAX_EXEC_ENV {
        return Err(ExecError::TooManyEnv);
    }
    for (name, value) in env {
        check_env(name, value)?;
    }
    if let Some(dir) = workdir {
        if dir.is_empty() || dir.len() > MAX_WORKDIR || dir.contains('\0') {
            return Err(ExecError::Workdir);
        }
    }
    if let Some(ms) = timeout_ms {
        if ms == 0 || ms > MAX_TIMEOUT_MS {
            return Err(ExecError::Timeout);
        }
    }
    // A few bytes of MessagePack overhead per string, generously counted.
    let total: usize = argv.iter().map(|a| a.len() + 8).sum::<usize>()
        + env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 16)
            .sum::<usize>()
        + workdir.map_or(0, str::len);
    if total > MAX_START_BYTES {
        return Err(ExecError::TooLarge);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Codec, ExecGuest, ExecHost};
    use proptest::prelude::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn host_goldens() -> Vec<(HostToExec, &'static str)> {
        vec![
            (
                HostToExec::Start {
                    argv: vec!["echo".into(), "hi".into()],
                    env: vec![("A".into(), "1".into())],
                    workdir: None,
                    timeout_ms: Some(1000),
                    tty: None,
                },
                "0000003b82a174a57374617274a16384a46172677692a46563686fa26869a3656e769192a141a131a7776f726b646972c0aa74696d656f75745f6d73cd03e8",
            ),
            (
                HostToExec::Stdin {
                    data: b"ab".to_vec(),
                },
                "0000001582a174a5737464696ea16381a464617461c4026162",
            ),
            (HostToExec::StdinEof, "0000000d81a174a9737464696e5f656f66"),
            (HostToExec::Signal { signal: 15 }, "0000001582a174a67369676e616ca16381a67369676e616c0f"),
        ]
    }

    fn guest_goldens() -> Vec<(ExecToHost, &'static str)> {
        vec![
            (
                ExecToHost::Output {
                    stream: ExecStream::Stderr,
                    data: vec![0, 255],
                },
                "0000002482a174a66f7574707574a16382a673747265616da6737464657272a464617461c40200ff",
            ),
            (
                ExecToHost::Exit {
                    exit_code: None,
                    signal: Some(9),
                    timed_out: true,
                    stdout_bytes: 3,
                    stderr_bytes: 0,
                },
                "0000004582a174a465786974a16385a9657869745f636f6465c0a67369676e616c09a974696d65645f6f7574c3ac7374646f75745f627974657303ac7374646572725f627974657300",
            ),
        ]
    }

    #[test]
    fn exec_golden_vectors() {
        for (msg, want) in host_goldens() {
            let got = Codec::<ExecHost>::encode(&msg).unwrap();
            assert_eq!(hex(&got), want.replace(char::is_whitespace, ""), "{msg:?}");
            let mut guest = Codec::<ExecGuest>::new();
            guest.feed(&got).unwrap();
            assert_eq!(guest.next_message().unwrap(), Some(msg));
        }
        for (msg, want) in guest_goldens() {
            let got = Codec::<ExecGuest>::encode(&msg).unwrap();
            assert_eq!(hex(&got), want.replace(char::is_whitespace, ""), "{msg:?}");
            let mut host = Codec::<ExecHost>::new();
            host.feed(&got).unwrap();
            assert_eq!(host.next_message().unwrap(), Some(msg));
        }
    }

    #[test]
    fn host_rejects_a_reflected_host_message() {
        let frame = Codec::<ExecHost>::encode(&HostToExec::StdinEof).unwrap();
        let mut host = Codec::<ExecHost>::new();
        host.feed(&frame).unwrap();
        assert!(host.next_message().is_err());
    }

    #[test]
    fn golden_exec_hello() {
        let frame = Codec::<ExecGuest>::encode(&ExecToHost::Hello { token: "ab".into() }).unwrap();
        // {"t":"hello","c":{"token":"ab"}}
        assert_eq!(
            frame,
            b"\x00\x00\x00\x15\x82\xa1t\xa5hello\xa1c\x81\xa5token\xa2ab".to_vec()
        );
    }

    #[test]
    fn full_chunks_fit_in_a_frame() {
        let out = ExecToHost::Output {
            stream: ExecStream::Stdout,
            data: vec![0xff; MAX_EXEC_CHUNK],
        };
        Codec::<ExecGuest>::encode(&out).unwrap();
        let inp = HostToExec::Stdin {
            data: vec![0xff; MAX_EXEC_CHUNK],
        };
        Codec::<ExecHost>::encode(&inp).unwrap();
    }

    #[test]
    fn env_names() {
        assert_eq!(check_env_name("FOO_1"), Ok(()));
        assert_eq!(check_env_name("_x"), Ok(()));
        for bad in ["", "1A", "A-B", "A=B", "A B", "é"] {
            assert!(
                matches!(check_env_name(bad), Err(ExecError::EnvName(_))),
                "{bad}"
            );
        }
        for denied in [
            "LD_PRELOAD",
            "ld_library_path",
            "BASH_ENV",
            "ENV",
            "IFS",
            "BASH_FUNC_x",
            "PROMPT_COMMAND",
            "PS4",
            "SHELLOPTS",
            "BASHOPTS",
            "PERL5OPT",
            "PYTHONSTARTUP",
        ] {
            assert!(
                matches!(check_env_name(denied), Err(ExecError::EnvDenied(_))),
                "{denied}"
            );
        }
        assert!(check_env_name(&"A".repeat(MAX_ENV_NAME + 1)).is_err());
        assert!(check_env("A", &"v".repeat(MAX_ENV_VALUE + 1)).is_err());
        assert!(check_env("A", "a\0b").is_err());
    }

    #[test]
    fn start_bounds() {
        let argv = |n: usize| vec!["x".to_owned(); n];
        assert_eq!(check_start(&argv(1), &[], None, None), Ok(()));
        assert_eq!(check_start(&[], &[], None, None), Err(ExecError::NoCommand));
        assert_eq!(
            check_start(&argv(MAX_EXEC_ARGS + 1), &[], None, None),
            Err(ExecError::TooManyArgs)
        );
        assert_eq!(
            check_start(&["x".repeat(MAX_EXEC_ARG_LEN + 1)], &[], None, None),
            Err(ExecError::ArgTooLong)
        );
        assert_eq!(
            check_start(&argv(1), &[], Some(""), None),
            Err(ExecError::Workdir)
        );
        assert_eq!(
            check_start(&argv(1), &[], None, Some(0)),
            Err(ExecError::Timeout)
        );
        let big = vec!["x".repeat(MAX_EXEC_ARG_LEN); 8];
        assert_eq!(check_start(&big, &[], None, None), Err(ExecError::TooLarge));
        // The largest accepted request still encodes into one frame.
        let n = MAX_START_BYTES / (MAX_EXEC_ARG_LEN + 8);
        let largest = vec!["x".repeat(MAX_EXEC_ARG_LEN); n];
        check_start(&largest, &[], None, None).unwrap();
        Codec::<ExecHost>::encode(&HostToExec::Start {
            argv: largest,
            env: vec![],
            workdir: None,
            timeout_ms: None,
            tty: None,
        })
        .unwrap();
        let env = vec![("A".to_owned(), String::new()); MAX_EXEC_ENV + 1];
        assert_eq!(
            check_start(&argv(1), &env, None, None),
            Err(ExecError::TooManyEnv)
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_either_side(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut host = Codec::<ExecHost>::new();
            if host.feed(&bytes).is_ok() {
                while let Ok(Some(_)) = host.next_message() {}
            }
            let mut guest = Codec::<ExecGuest>::new();
            if guest.feed(&bytes).is_ok() {
                while let Ok(Some(_)) = guest.next_message() {}
            }
        }

        #[test]
        fn output_round_trips(data in proptest::collection::vec(any::<u8>(), 0..4096), err in any::<bool>()) {
            let stream = if err { ExecStream::Stderr } else { ExecStream::Stdout };
            let msg = ExecToHost::Output { stream, data };
            let frame = Codec::<ExecGuest>::encode(&msg).unwrap();
            let mut host = Codec::<ExecHost>::new();
            host.feed(&frame).unwrap();
            prop_assert_eq!(host.next_message().unwrap(), Some(msg));
        }
    }
}
