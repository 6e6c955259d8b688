//! The guest console: QEMU writes it to a pipe; each line goes to
//! `<vm-dir>/serial.log` prefixed with the host's wall-clock time, up to a
//! cap, so a guest printing forever cannot fill the disk. A kernel panic line
//! is remembered so the session can say why the VM stopped, the last line
//! so a boot that never connects can say where the guest got to, and a
//! kernel line that says the boot cannot work ([`BOOT_FAULTS`]) wakes the
//! session, which boots the guest again.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;

/// Bytes of console output kept in serial.log.
pub const SERIAL_LOG_CAP: u64 = 4 * 1024 * 1024;
/// Longest line kept whole; longer lines are split.
const MAX_LINE: usize = 4096;

/// Longest console line kept for a message (guest text: bounded, and
/// control characters dropped before it reaches any terminal).
const MAX_FACT: usize = 200;

/// Kernel warnings (shown at the `loglevel=5` capsem boots with) after which
/// the boot hangs: the local APIC timer failed its calibration, which a
/// host stall of the vCPU inside the kernel's first 4 ms of measuring
/// causes, and microvm has no other timer to fall back on (no tick: the
/// second CPU's delay calibration waits for jiffies forever). See
/// docs/qemu-notes.md.
pub const BOOT_FAULTS: &[&str] = &[
    "APIC frequency too slow, disabling apic timer",
    "APIC timer disabled due to verification failure",
];

/// What the console told us about how the guest ended.
#[derive(Debug, Default, Clone)]
pub struct ConsoleFacts {
    inner: Arc<Mutex<Facts>>,
    fault: Arc<tokio::sync::Notify>,
}

#[derive(Debug, Default)]
struct Facts {
    panic: Option<String>,
    last: Option<String>,
    fault: Option<String>,
}

impl ConsoleFacts {
    /// The first kernel panic line, if the guest panicked.
    pub fn panic_line(&self) -> Option<String> {
        self.lock().panic.clone()
    }

    /// The last non-blank line the guest printed, if any.
    pub fn last_line(&self) -> Option<String> {
        self.lock().last.clone()
    }

    /// Resolves with the first [`BOOT_FAULTS`] line the guest prints.
    pub async fn boot_fault(&self) -> String {
        loop {
            if let Some(line) = self.lock().fault.clone() {
                return line;
            }
            // A notify_one before this await leaves a permit: not lost.
            self.fault.notified().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Facts> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn note(&self, line: &str) {
        let line = printable(line);
        if line.is_empty() {
            return;
        }
        let mut facts = self.lock();
        if facts.panic.is_none() && line.contains("Kernel panic") {
            facts.panic = Some(line.clone());
        }
        if facts.fault.is_none() && BOOT_FAULTS.iter().any(|f| line.contains(f)) {
            facts.fault = Some(line.clone());
            self.fault.notify_one();
        }
        facts.last = Some(line);
    }
}

/// `line` trimmed, control characters as spaces, at most [`MAX_FACT`]
/// characters.
fn printable(line: &str) -> String {
    line.trim()
        .chars()
        .take(MAX_FACT)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Appends timestamped lines, stopping at the cap.
#[derive(Debug)]
struct Writer<W> {
    out: W,
    written: u64,
    capped: bool,
}

impl<W: Write> Writer<W> {
    fn line(&mut self, raw: &[u8]) {
        if self.capped {
            return;
        }
        let text = String::from_utf8_lossy(raw);
        let text = text.trim_end_matches(['\r', '\n']);
        let entry = format!("{} {}\n", now(), text);
        if self.written + entry.len() as u64 > SERIAL_LOG_CAP {
            self.capped = true;
            let _ = writeln!(
                self.out,
                "{} [capsem: serial.log capped at {SERIAL_LOG_CAP} bytes]",
                now()
            );
            return;
        }
        self.written += entry.len() as u64;
        let _ = self.out.write_all(entry.as_bytes());
    }
}

/// Splits `buf` into lines, keeping an unterminated tail in `partial`.
fn split_lines(partial: &mut Vec<u8>, buf: &[u8], mut each: impl FnMut(&[u8])) {
    for &b in buf {
        if b == b'\n' || partial.len() >= MAX_LINE {
            each(partial);
            partial.clear();
            if b == b'\n' {
                continue;
            }
        }
        partial.push(b);
    }
}

/// Copies the console pipe into `log` until QEMU closes it.
pub fn spawn(pipe: OwnedFd, log: &Path, facts: ConsoleFacts) -> std::io::Result<JoinHandle<()>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut rx = tokio::net::unix::pipe::Receiver::from_owned_fd(pipe)?;
    Ok(tokio::spawn(async move {
        let mut w = Writer {
            out: file,
            written: 0,
            capped: false,
        };
        let mut partial = Vec::new();
        let mut buf = vec![0u8; 16384];
        loop {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => split_lines(&mut partial, &buf[..n], |l| {
                    facts.note(&String::from_utf8_lossy(l));
                    w.line(l);
                }),
            }
        }
        if !partial.is_empty() {
            w.line(&partial);
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_timestamped_and_capped() {
        let mut w = Writer {
            out: Vec::new(),
            written: 0,
            capped: false,
        };
        w.line(b"hello\r\n");
        let text = String::from_utf8(w.out.clone()).unwrap();
        let (stamp, rest) = text.split_once(' ').unwrap();
        assert!(
            time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339)
                .is_ok()
        );
        assert_eq!(rest, "hello\n");
        let long = vec![b'x'; 1000];
        for _ in 0..(SERIAL_LOG_CAP / 1000 + 10) {
            w.line(&long);
        }
        assert!(w.capped);
        assert!(w.out.len() as u64 <= SERIAL_LOG_CAP + 200);
        assert!(String::from_utf8_lossy(&w.out).contains("capped"));
    }

    #[test]
    fn facts_keep_the_first_panic_and_the_last_line_made_printable() {
        let facts = ConsoleFacts::default();
        assert_eq!(facts.last_line(), None);
        facts.note("[ 0.5] booting\r");
        facts.note("   ");
        assert_eq!(facts.last_line().as_deref(), Some("[ 0.5] booting"));
        facts.note("Kernel panic - not syncing: \x1b[2Jfirst");
        facts.note("Kernel panic - not syncing: second");
        facts.note(&"z".repeat(MAX_FACT * 2));
        assert_eq!(
            facts.panic_line().as_deref(),
            Some("Kernel panic - not syncing:  [2Jfirst")
        );
        assert_eq!(facts.last_line(), Some("z".repeat(MAX_FACT)));
    }

    #[tokio::test]
    async fn a_boot_fault_line_wakes_the_waiter_once_noted() {
        let facts = ConsoleFacts::default();
        facts.note("[    0.21] APIC: Switch to symmetric I/O mode setup");
        let waiter = {
            let facts = facts.clone();
            tokio::spawn(async move { facts.boot_fault().await })
        };
        facts.note("[    0.22] APIC frequency too slow, disabling apic timer");
        facts.note("[    0.23] APIC timer disabled due to verification failure");
        assert_eq!(
            waiter.await.unwrap(),
            "[    0.22] APIC frequency too slow, disabling apic timer"
        );
        // Noted before anyone waited: still seen.
        let early = ConsoleFacts::default();
        early.note("APIC timer disabled due to verification failure");
        assert_eq!(
            early.boot_fault().await,
            "APIC timer disabled due to verification failure"
        );
    }

    #[test]
    fn splitting_keeps_partial_lines_and_bounds_length() {
        let mut partial = Vec::new();
        let mut lines = Vec::new();
        split_lines(&mut partial, b"a\nbc", |l| lines.push(l.to_vec()));
        split_lines(&mut partial, b"d\n", |l| lines.push(l.to_vec()));
        assert_eq!(lines, vec![b"a".to_vec(), b"bcd".to_vec()]);
        let mut lines = 0;
        split_lines(&mut partial, &vec![b'y'; MAX_LINE * 3], |_| lines += 1);
        assert_eq!(lines, 2);
        assert_eq!(partial.len(), MAX_LINE);
    }

    #[test]
    fn remembers_the_panic_line() {
        let f = ConsoleFacts::default();
        f.note("[ 1.0] ok");
        assert_eq!(f.panic_line(), None);
        f.note("[ 2.0] Kernel panic - not syncing: sysrq triggered crash");
        f.note("[ 2.1] Kernel panic - second");
        assert_eq!(
            f.panic_line().unwrap(),
            "[ 2.0] Kernel panic - not syncing: sysrq triggered crash"
        );
    }
}
