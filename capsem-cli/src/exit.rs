//! capsem's exit codes: one type, [`Exit`], that every command returns, so
//! `--help`, the crate doc and the code agree.
//!
//! | code | [`Exit`] | meaning |
//! |---|---|---|
//! | 0..=255 | `Status(N)` | the shell's (or command's) own exit status |
//! | 124 | `TimedOut` | `capsem run`/`exec`: `--timeout` expired |
//! | 125 | `Failed` | capsem itself failed before the shell ran (bad usage, no capsem-process, the VM did not start, an unreadable home), or refused the request (a denied `-e` variable, an oversized command) |
//! | 126 | `Status(126)` | `run`/`exec`: the command is not executable (the agent's status, as in a shell) |
//! | 127 | `Status(127)` | `run`/`exec`: the command was not found (likewise) |
//! | 128 + N | `Signal(N)` | the shell was killed by signal N, or capsem was stopped by signal N (SIGHUP, SIGTERM, SIGINT) |
//! | 255 | `Lost` | the session was lost without an exit status |
//! | 1 | `DoctorMissing` | `capsem doctor` found something missing |
//! | 1 | `CopyFailed` | `capsem cp`: the copy failed (no such path, permission, a refused stream) |

use std::process::ExitCode;

/// How capsem exits. `code()` is the number the shell sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The shell's or command's own status, passed through.
    Status(u8),
    /// Killed by (or capsem stopped by) signal N: 128 + N; a number no
    /// real signal has (it comes from the guest) counts as [`Exit::Lost`].
    Signal(i32),
    /// `--timeout` expired: 124.
    TimedOut,
    /// capsem failed or refused the request: 125.
    Failed,
    /// The session ended without an exit status: 255.
    Lost,
    /// `capsem doctor` found something missing: 1.
    DoctorMissing,
    /// `capsem cp`: the copy failed: 1, like `docker cp` and `cp`.
    CopyFailed,
}

/// capsem failed before the shell ran.
pub const CAPSEM_FAILED: u8 = 125;
/// The `--timeout` expired.
pub const TIMED_OUT: u8 = 124;
/// The session ended without an exit status.
pub const SESSION_LOST: u8 = 255;
/// `capsem doctor` found something missing.
pub const DOCTOR_MISSING: u8 = 1;
/// `capsem cp` failed.
pub const COPY_FAILED: u8 = 1;

impl Exit {
    /// Success: status 0.
    pub const OK: Exit = Exit::Status(0);

    /// The process exit status.
    pub fn code(self) -> u8 {
        match self {
            Exit::Status(n) => n,
            Exit::Signal(sig) => match u8::try_from(sig) {
                Ok(n @ 1..=127) => 128 + n,
                _ => SESSION_LOST,
            },
            Exit::TimedOut => TIMED_OUT,
            Exit::Failed => CAPSEM_FAILED,
            Exit::Lost => SESSION_LOST,
            Exit::DoctorMissing => DOCTOR_MISSING,
            Exit::CopyFailed => COPY_FAILED,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// Text for `capsem --help`: the exit statuses, and the escapes of
/// [`crate::escape`] (255 is theirs too).
pub const HELP: &str = "\
Escapes (capsem shell, run -t and exec -t, stdin a terminal, typed at the
start of a line, as in ssh):
  ~.       temporary VM (shell, run -t): destroy it at once, without waiting
           for the guest (works when it is wedged), and exit 255 with one
           line saying so; capsem shell NAME: detach at once; exec -t: leave
           at once and exit 255; the VM keeps running
  ~?       list the escapes
  ~~       send one ~
  Ctrl-]   capsem shell NAME: detach (anywhere in a line)

Exit status:
  N        the shell's exit status
  128+N    the shell was killed by signal N, or capsem received signal N
           (SIGHUP, SIGTERM; SIGINT while waiting for the VM)
  125      capsem failed before the shell ran (usage error, capsem-process
           missing, the VM did not start, the home cannot be read)
  255      the session was lost without an exit status, or ~. destroyed
           the temporary VM (or left exec -t)

capsem run: the command's exit status, 124 when --timeout expired, 126 when
it is not executable, 127 when it was not found, 128+N when signal N killed
it (or capsem received signal N), 125 when capsem failed or refused the
request (for example -e LD_PRELOAD=...), 255 when the session was lost

capsem doctor: 0 when nothing is missing, 1 when something is
(125 on a usage error).

capsem cp: 0 when the copy is done, 1 when it failed (no such path in the
VM or here, permission, a stream that would write outside DST), 125 on a
usage error or a VM that is unknown or not running.";

/// "Killed by signal `sig`" (or capsem got `sig`).
pub fn from_signal(sig: i32) -> Exit {
    Exit::Signal(sig)
}

/// The exit for a `ShellExited` report, `None` when the report carries no
/// usable status (then the session counts as lost). A signal wins over an
/// exit code; both come from the guest and are range-checked.
pub fn from_shell(exit_code: Option<i32>, signal: Option<i32>) -> Option<Exit> {
    match (exit_code, signal) {
        (_, Some(sig)) => Some(from_signal(sig)),
        (Some(code), None) => u8::try_from(code).ok().map(Exit::Status),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(e: Option<Exit>) -> Option<u8> {
        e.map(Exit::code)
    }

    #[test]
    fn shell_status_maps_to_exit_codes() {
        assert_eq!(code(from_shell(Some(0), None)), Some(0));
        assert_eq!(code(from_shell(Some(7), None)), Some(7));
        assert_eq!(code(from_shell(Some(255), None)), Some(255));
        assert_eq!(code(from_shell(None, Some(9))), Some(137));
        assert_eq!(code(from_shell(None, Some(15))), Some(143));
        assert_eq!(code(from_shell(Some(1), Some(2))), Some(130));
        assert_eq!(from_shell(None, None), None);
        // Out-of-range values from an untrusted guest.
        assert_eq!(from_shell(Some(256), None), None);
        assert_eq!(from_shell(Some(-1), None), None);
        assert_eq!(code(from_shell(None, Some(0))), Some(SESSION_LOST));
        assert_eq!(code(from_shell(None, Some(200))), Some(SESSION_LOST));
    }

    #[test]
    fn signals_map_to_128_plus_n() {
        assert_eq!(from_signal(libc::SIGHUP).code(), 129);
        assert_eq!(from_signal(libc::SIGINT).code(), 130);
        assert_eq!(from_signal(libc::SIGTERM).code(), 143);
    }

    #[test]
    fn every_variant_has_its_documented_code() {
        assert_eq!(Exit::OK.code(), 0);
        // 126 and 127 are the agent's statuses, passed through.
        assert_eq!(Exit::Status(126).code(), 126);
        assert_eq!(Exit::TimedOut.code(), 124);
        assert_eq!(Exit::Failed.code(), 125);
        assert_eq!(Exit::Lost.code(), 255);
        assert_eq!(Exit::DoctorMissing.code(), 1);
        assert_eq!(Exit::CopyFailed.code(), 1);
        assert!(HELP.contains("capsem cp: 0"));
        for code in ["124", "125", "126", "127", "128+N", "255"] {
            assert!(HELP.contains(code), "{code}");
        }
    }
}
