//! Console output for PID 1: one line per event, stamped with the guest's
//! boot clock (the host stamps serial lines with wall-clock time anyway).

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;

use nix::fcntl::{fcntl, FcntlArg};

/// Microseconds since the guest kernel started, suspend included.
pub fn boottime_micros() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME always exists
    // on Linux >= 2.6.39, so the call cannot fail with these arguments.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1_000_000 + nanos / 1_000
}

/// Formats one console line; split out so tests can check the format.
pub fn format_line(micros: u64, args: fmt::Arguments<'_>) -> String {
    format!(
        "[{:>5}.{:06}] capsem-init: {args}\n",
        micros / 1_000_000,
        micros % 1_000_000
    )
}

/// Writes one line to stderr, which is the console once [`ensure_stdio`] ran.
/// A console write error is ignored: there is nowhere else to report it.
pub fn line(args: fmt::Arguments<'_>) {
    let text = format_line(boottime_micros(), args);
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// Logs one console line with `format!` syntax.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::console::line(format_args!($($arg)*)) };
}

/// Makes sure fds 0, 1 and 2 are open. The kernel opens `/dev/console` for
/// PID 1 when the initramfs has it (its built-in cpio does); if it could not,
/// the fds are closed and the first file opened would take fd 0, so reopen
/// the console from devtmpfs onto the missing ones.
pub fn ensure_stdio() {
    let missing: Vec<i32> = (0..3)
        .filter(|fd| fcntl(*fd, FcntlArg::F_GETFD).is_err())
        .collect();
    if missing.is_empty() {
        return;
    }
    let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return;
    };
    for fd in missing {
        // SAFETY: dup2 onto a closed descriptor number in 0..3 that nothing in
        // this process owns; `console` stays open for the duration of the call.
        unsafe {
            libc::dup2(console.as_raw_fd(), fd);
        }
    }
    // If `console` itself landed on 0..2 it was just dup2'ed onto itself or
    // others; keep it open rather than closing a stdio descriptor.
    if console.as_raw_fd() <= 2 {
        std::mem::forget(console);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_format_has_seconds_and_micros() {
        assert_eq!(
            format_line(1_234_567, format_args!("hi {}", 1)),
            "[    1.234567] capsem-init: hi 1\n"
        );
    }

    #[test]
    fn boottime_advances() {
        let a = boottime_micros();
        let b = boottime_micros();
        assert!(a > 0 && b >= a);
    }
}
