//! capsem's exit codes, in one place so `--help`, the crate doc and the code
//! agree.
//!
//! | code | meaning |
//! |---|---|
//! | 0..=124, ... | the shell's own exit status |
//! | 128 + N | the shell was killed by signal N, or capsem was stopped by signal N (SIGHUP, SIGTERM, SIGINT) |
//! | 125 | capsem itself failed before the shell ran (bad usage, no capsem-process, the VM did not start) |
//! | 255 | the session was lost without an exit status |
//!
//! `capsem run` uses the same codes for its command, plus 124 (the
//! `--timeout` expired), 126 (not executable), 127 (not found), and 125 also
//! for a refused request (a denied `-e` variable, an oversized command).
//!
//! `capsem doctor`: 0 when nothing is missing, 1 when something is.

/// capsem failed before the shell ran.
pub const CAPSEM_FAILED: u8 = 125;
/// The session ended without an exit status.
pub const SESSION_LOST: u8 = 255;
/// `capsem doctor` found something missing.
pub const DOCTOR_MISSING: u8 = 1;

/// Text for `capsem --help`.
pub const HELP: &str = "\
Exit status:
  N        the shell's exit status
  128+N    the shell was killed by signal N, or capsem received signal N
           (SIGHUP, SIGTERM; SIGINT while waiting for the VM)
  125      capsem failed before the shell ran (usage error, capsem-process
           missing, the VM did not start)
  255      the session was lost without an exit status

capsem run: the command's exit status, 124 when --timeout expired, 126 when
it is not executable, 127 when it was not found, 128+N when signal N killed
it (or capsem received signal N), 125 when capsem failed or refused the
request (for example -e LD_PRELOAD=...), 255 when the session was lost

capsem doctor: 0 when nothing is missing, 1 when something is
(125 on a usage error).";

/// Exit code for "killed by signal `sig`": 128 + N, or 255 for a signal
/// number no real signal has (the value comes from the guest).
pub fn from_signal(sig: i32) -> u8 {
    match u8::try_from(sig) {
        Ok(n @ 1..=127) => 128 + n,
        _ => SESSION_LOST,
    }
}

/// Exit code for a `ShellExited` report, `None` when the report carries no
/// usable status (then the session counts as lost). A signal wins over an
/// exit code; both come from the guest and are range-checked.
pub fn from_shell(exit_code: Option<i32>, signal: Option<i32>) -> Option<u8> {
    match (exit_code, signal) {
        (_, Some(sig)) => Some(from_signal(sig)),
        (Some(code), None) => u8::try_from(code).ok(),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_status_maps_to_exit_codes() {
        assert_eq!(from_shell(Some(0), None), Some(0));
        assert_eq!(from_shell(Some(7), None), Some(7));
        assert_eq!(from_shell(Some(255), None), Some(255));
        assert_eq!(from_shell(None, Some(9)), Some(137));
        assert_eq!(from_shell(None, Some(15)), Some(143));
        assert_eq!(from_shell(Some(1), Some(2)), Some(130));
        assert_eq!(from_shell(None, None), None);
        // Out-of-range values from an untrusted guest.
        assert_eq!(from_shell(Some(256), None), None);
        assert_eq!(from_shell(Some(-1), None), None);
        assert_eq!(from_shell(None, Some(0)), Some(SESSION_LOST));
        assert_eq!(from_shell(None, Some(200)), Some(SESSION_LOST));
    }

    #[test]
    fn signals_map_to_128_plus_n() {
        assert_eq!(from_signal(libc::SIGHUP), 129);
        assert_eq!(from_signal(libc::SIGINT), 130);
        assert_eq!(from_signal(libc::SIGTERM), 143);
    }
}
