//! The guest's execve records as `capsem audit` prints them.
//!
//! capsem-process stores them in `<vm-dir>/audit.jsonl` (one JSON object
//! per line, rotated to `audit.jsonl.1`; see `docs/cli-json.md`). This
//! prints `audit.jsonl.1` then `audit.jsonl`, one line per record:
//!
//! ```text
//! 2026-01-02T03:04:05.123Z pid=42 ppid=1 uid=0 cwd=/root ls -l 'my file'
//! ```
//!
//! The guest is hostile: `cwd` and every argv element are shell-quoted
//! where needed, and control characters (C0, DEL, C1) and bidirectional
//! formatting characters are escaped (`$'a\nb'`), so nothing the guest
//! wrote reaches the terminal raw. A failed execve or a cut argv ends the
//! line with a comment, `# failed` / `# argv truncated` (an argument that
//! starts with `#` is always quoted, so the comment is unambiguous).
//! `--json` prints the stored lines as they are, after checking that each
//! parses as a record; the same characters are written as `\uXXXX` JSON
//! escapes (the same JSON value). A line that does not parse is skipped
//! with a warning on stderr; a last line still being written is left out.
//!
//! `--follow` keeps printing new records until the VM's capsem-process
//! exits, through [`crate::follow::follow_log`] (inotify, pidfd, signalfd
//! and stdout in one poll set), the records going through [`Printer`]. It
//! follows `audit.jsonl` by name, so a rotation is seen: the old file is
//! drained, the new one read from its start. Works for persistent VMs and
//! for temporary ones while they run (`tmp-...` ids). SIGINT ends it with
//! exit 0, SIGTERM and SIGHUP with 128 + N.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use capsem_proto::audit::AuditRecord;

use crate::follow::{follow_log, End, FollowError, StopSource};

/// The stored records.
pub const AUDIT_FILE: &str = "audit.jsonl";
/// The records before the last rotation.
pub const ROTATED_FILE: &str = "audit.jsonl.1";
/// A longer stored line is skipped (a record is at most a 64 KiB frame,
/// JSON-escaped).
const MAX_LINE: usize = 1024 * 1024;

/// Why printing the audit records failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write to stdout")]
    Write(#[source] io::Error),
    #[error(transparent)]
    Follow(#[from] FollowError),
}

/// Whether `c` must not reach a terminal raw: control characters (C0,
/// DEL, C1) and the bidirectional formatting ones, which can make a
/// command line read as another.
fn dangerous(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{2066}'..='\u{2069}'
        )
}

/// `s` as one shell word: bare when it is plain, in single quotes when it
/// has spaces or shell syntax, in `$'...'` with escapes when it has a
/// [`dangerous`] character.
pub fn quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        return s.to_owned();
    }
    if !s.chars().any(dangerous) {
        return format!("'{}'", s.replace('\'', r"'\''"));
    }
    let mut out = String::from("$'");
    for c in s.chars() {
        match c {
            '\\' => out.push_str(r"\\"),
            '\'' => out.push_str(r"\'"),
            '\n' => out.push_str(r"\n"),
            '\t' => out.push_str(r"\t"),
            '\r' => out.push_str(r"\r"),
            c if dangerous(c) && (c as u32) < 0x80 => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if dangerous(c) => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds.
fn time(ms: u64) -> String {
    let secs = capsem_host::vmstate::rfc3339(ms / 1000);
    let date = secs.strip_suffix('Z').unwrap_or(&secs);
    format!("{date}.{:03}Z", ms % 1000)
}

/// One record as one line of text (no newline).
pub fn format_record(r: &AuditRecord) -> String {
    let mut line = format!(
        "{} pid={} ppid={} uid={} cwd={}",
        time(r.time_ms),
        r.pid,
        r.ppid,
        r.uid,
        quote(&r.cwd)
    );
    for arg in &r.argv {
        line.push(' ');
        line.push_str(&quote(arg));
    }
    let notes: Vec<&str> = [
        (!r.success).then_some("failed"),
        r.argv_truncated.then_some("argv truncated"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !notes.is_empty() {
        line.push_str(" # ");
        line.push_str(&notes.join(", "));
    }
    line
}

/// A stored JSON line with every [`dangerous`] character written as a
/// JSON escape: the same value (such characters only occur inside
/// strings), safe on a terminal.
pub fn safe_json(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        if dangerous(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Turns the bytes of the stored files into the output: whole lines are
/// checked and printed, a partial one waits for the rest.
#[derive(Debug)]
pub struct Printer<W> {
    out: W,
    json: bool,
    partial: Vec<u8>,
    /// Inside a line over [`MAX_LINE`], skipped up to its end.
    overlong: bool,
    /// Lines that were not records.
    pub skipped: u64,
}

impl<W: Write> Printer<W> {
    pub fn new(out: W, json: bool) -> Self {
        Self {
            out,
            json,
            partial: Vec::new(),
            overlong: false,
            skipped: 0,
        }
    }

    fn line(&mut self, line: &[u8]) -> io::Result<()> {
        let parsed = std::str::from_utf8(line)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                serde_json::from_str::<AuditRecord>(text)
                    .map(|r| (text, r))
                    .map_err(|e| e.to_string())
            });
        match parsed {
            Ok((text, _)) if self.json => writeln!(self.out, "{}", safe_json(text)),
            Ok((_, record)) => writeln!(self.out, "{}", format_record(&record)),
            Err(e) => {
                self.skipped += 1;
                eprintln!("capsem: skipping an audit line that is not a record: {e}");
                Ok(())
            }
        }
    }

    /// Copies the whole of `path` (if it exists) through the printer.
    fn print_file(&mut self, file: Option<&File>, path: &Path) -> Result<(), AuditError> {
        let Some(mut file) = file else {
            return Ok(());
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(AuditError::Read {
                        path: path.into(),
                        source,
                    })
                }
            };
            self.write_all(&buf[..n]).map_err(AuditError::Write)?;
        }
        // A line cut at the end of a file is not continued by the next.
        self.partial.clear();
        self.overlong = false;
        Ok(())
    }
}

impl<W: Write> Write for Printer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = (&rest[..nl], &rest[nl + 1..]);
            rest = tail;
            if std::mem::take(&mut self.overlong) {
                continue;
            }
            if self.partial.is_empty() {
                self.line(head)?;
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(head);
                self.line(&whole)?;
            }
        }
        if !self.overlong {
            self.partial.extend_from_slice(rest);
            if self.partial.len() > MAX_LINE {
                self.partial = Vec::new();
                self.overlong = true;
                self.skipped += 1;
                eprintln!("capsem: skipping an audit line of more than {MAX_LINE} bytes");
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl<W: AsFd> AsFd for Printer<W> {
    /// The output's fd: the follower watches it for a reader that left.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.out.as_fd()
    }
}

/// Opens `path` for reading; `None` when it does not exist.
fn open_opt(path: &Path) -> Result<Option<File>, AuditError> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AuditError::Open {
            path: path.into(),
            source,
        }),
    }
}

fn same_file(a: &File, b: &File) -> bool {
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Prints `audit.jsonl.1` of VM directory `dir`; returns `audit.jsonl`,
/// opened (if it exists) but not printed yet.
fn print_rotated<W: Write>(
    dir: &Path,
    printer: &mut Printer<W>,
) -> Result<Option<File>, AuditError> {
    let current = dir.join(AUDIT_FILE);
    let rotated = dir.join(ROTATED_FILE);
    // The current file first: a rotation after this moves it to .1, where
    // it is then read (once) instead of an older .1.
    let now = open_opt(&current)?;
    let old = open_opt(&rotated)?;
    let old = old.filter(|o| !now.as_ref().is_some_and(|n| same_file(n, o)));
    printer.print_file(old.as_ref(), &rotated)?;
    Ok(now)
}

/// Prints the records stored in VM directory `dir`.
pub fn print_records<W: Write>(dir: &Path, printer: &mut Printer<W>) -> Result<(), AuditError> {
    let now = print_rotated(dir, printer)?;
    printer.print_file(now.as_ref(), &dir.join(AUDIT_FILE))?;
    printer.flush().map_err(AuditError::Write)
}

/// Prints the records stored in VM directory `dir`, then those appended
/// until the process behind `process` (a pidfd) exits or `stop` says so.
pub fn follow_records<W: Write + AsFd, S: StopSource>(
    dir: &Path,
    printer: &mut Printer<W>,
    process: BorrowedFd<'_>,
    stop: &mut S,
) -> Result<End, AuditError> {
    let current = dir.join(AUDIT_FILE);
    let now = print_rotated(dir, printer)?;
    // The follower reads `audit.jsonl` by name from its start; if that is
    // no longer the file opened above (rotated since), print that first.
    let moved = match (&now, open_opt(&current)?) {
        (Some(n), Some(c)) => !same_file(n, &c),
        (Some(_), None) => true,
        _ => false,
    };
    if moved {
        printer.print_file(now.as_ref(), &current)?;
    }
    Ok(follow_log(&current, printer, process, stop)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::follow::tests::{expect, PipeStop};
    use crate::testutil::{config, make_vm, Marked};

    fn record(serial: u64) -> AuditRecord {
        AuditRecord {
            serial,
            time_ms: 1_767_323_045_123,
            pid: 42,
            ppid: 1,
            uid: 1000,
            exe: "/bin/ls".into(),
            argv: vec!["ls".into(), "-l".into(), format!("file {serial}")],
            argv_truncated: false,
            cwd: "/home/me".into(),
            tty: "pts0".into(),
            success: true,
            audit_id: format!("1767323045.123:{serial}"),
        }
    }

    fn line(serial: u64) -> String {
        serde_json::to_string(&record(serial)).unwrap() + "\n"
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("ls"), "ls");
        assert_eq!(quote("/usr/bin/a-b_c.d"), "/usr/bin/a-b_c.d");
        assert_eq!(quote("--x=1,2:3@4%5+"), "--x=1,2:3@4%5+");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("#x"), "'#x'");
        assert_eq!(quote("~"), "'~'");
        assert_eq!(quote("$HOME;rm"), "'$HOME;rm'");
        assert_eq!(quote("café"), "'café'");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(quote("a\nb"), r"$'a\nb'");
        assert_eq!(quote("\x1b[31mred"), r"$'\x1b[31mred'");
        assert_eq!(quote("t\tr\r"), r"$'t\tr\r'");
        assert_eq!(quote("del\x7f"), r"$'del\x7f'");
        assert_eq!(quote("\0"), r"$'\x00'");
        assert_eq!(quote("c1\u{9b}2J"), r"$'c1\u009b2J'");
        assert_eq!(quote("evil\u{202e}txt.exe"), r"$'evil\u202etxt.exe'");
        assert_eq!(quote("it's\n\\"), r"$'it\'s\n\\'");
        for s in [
            "\x1b]0;title\x07",
            "a\u{85}b",
            "\u{2066}x\u{2069}",
            "\u{feff}é\n",
        ] {
            let q = quote(s);
            assert!(!q.chars().any(dangerous), "{q:?}");
        }
    }

    #[test]
    fn one_line_per_record() {
        assert_eq!(
            format_record(&record(1)),
            "2026-01-02T03:04:05.123Z pid=42 ppid=1 uid=1000 cwd=/home/me ls -l 'file 1'"
        );
        let mut r = record(2);
        r.success = false;
        r.argv_truncated = true;
        r.cwd = "/tmp/a b\n".into();
        r.argv = vec!["#".into(), "\x1b[2J".into()];
        r.time_ms = 5;
        assert_eq!(
            format_record(&r),
            r"1970-01-01T00:00:00.005Z pid=42 ppid=1 uid=1000 cwd=$'/tmp/a b\n' '#' $'\x1b[2J' # failed, argv truncated"
        );
        r.argv.clear();
        r.success = true;
        r.argv_truncated = false;
        assert!(format_record(&r).ends_with("cwd=$'/tmp/a b\\n'"));
    }

    #[test]
    fn the_printer_takes_whole_lines_and_skips_the_rest() {
        let mut text = Printer::new(Vec::new(), false);
        let all = format!("{}not json\n{}{}", line(1), line(2), &line(3)[..20]);
        // Split anywhere: the output is the same.
        for chunk in all.as_bytes().chunks(7) {
            text.write_all(chunk).unwrap();
        }
        let out = String::from_utf8(text.out.clone()).unwrap();
        assert_eq!(
            out,
            format!(
                "{}\n{}\n",
                format_record(&record(1)),
                format_record(&record(2))
            )
        );
        assert_eq!(text.skipped, 1);

        let mut json = Printer::new(Vec::new(), true);
        let mut r = record(4);
        r.argv.push("\x1b[2J\u{9b}\u{202e}\x7f".into());
        let evil = serde_json::to_string(&r).unwrap() + "\n";
        json.write_all(line(1).as_bytes()).unwrap();
        json.write_all(evil.as_bytes()).unwrap();
        json.write_all(b"{\"serial\":1}\n").unwrap();
        let out = String::from_utf8(json.out.clone()).unwrap();
        let mut lines = out.lines();
        assert_eq!(lines.next().unwrap(), line(1).trim_end(), "as stored");
        let escaped = lines.next().unwrap();
        assert!(!escaped.chars().any(dangerous), "{escaped:?}");
        assert_eq!(serde_json::from_str::<AuditRecord>(escaped).unwrap(), r);
        assert_eq!(lines.next(), None);
        assert_eq!(json.skipped, 1);

        let mut big = Printer::new(Vec::new(), false);
        big.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
        big.write_all(b"yyy\n").unwrap();
        big.write_all(line(5).as_bytes()).unwrap();
        assert_eq!(big.skipped, 1);
        assert_eq!(
            String::from_utf8(big.out).unwrap(),
            format!("{}\n", format_record(&record(5)))
        );
    }

    #[test]
    fn prints_the_rotated_file_first_then_the_current_one() {
        let home = tempfile::tempdir().unwrap();
        let dir = make_vm(home.path(), "dev", Some(&config("dev", false, None)), None);
        let mut p = Printer::new(Vec::new(), true);
        // No records yet: nothing, and no error.
        print_records(&dir, &mut p).unwrap();
        assert!(p.out.is_empty());
        std::fs::write(dir.join(ROTATED_FILE), line(1) + &line(2)).unwrap();
        // A line still being written is left out.
        std::fs::write(dir.join(AUDIT_FILE), line(3) + &line(4)[..9]).unwrap();
        print_records(&dir, &mut p).unwrap();
        assert_eq!(
            String::from_utf8(p.out).unwrap(),
            line(1) + &line(2) + &line(3)
        );

        // A rotation caught half-way (both names on one file): once.
        std::fs::remove_file(dir.join(ROTATED_FILE)).unwrap();
        std::fs::hard_link(dir.join(AUDIT_FILE), dir.join(ROTATED_FILE)).unwrap();
        let mut p = Printer::new(Vec::new(), true);
        print_records(&dir, &mut p).unwrap();
        assert_eq!(String::from_utf8(p.out).unwrap(), line(3));
    }

    fn append(path: &Path, data: &str) {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(data.as_bytes()).unwrap();
    }

    #[test]
    fn follows_through_a_rotation_until_the_process_exits() {
        let d = tempfile::tempdir().unwrap();
        let current = d.path().join(AUDIT_FILE);
        let rotated = d.path().join(ROTATED_FILE);
        std::fs::write(&rotated, line(0)).unwrap();
        std::fs::write(&current, line(1)).unwrap();
        let mut process = Marked::spawn("capsem-process");
        let (out_r, out_w) = nix::unistd::pipe().unwrap();
        let (mut out_r, out_w) = (File::from(out_r), File::from(out_w));
        let (stop_r, _stop_w) = nix::unistd::pipe().unwrap();
        let pidfd = capsem_host::pidfd::pidfd_open(process.child.id()).unwrap();
        let dir = d.path().to_path_buf();
        let follower = std::thread::Builder::new()
            .name("audit-follow-test".into())
            .spawn(move || {
                let mut printer = Printer::new(out_w, false);
                let mut stop = PipeStop(stop_r);
                follow_records(&dir, &mut printer, pidfd.as_fd(), &mut stop)
            })
            .unwrap();
        let text = |s| format_record(&record(s)) + "\n";
        expect(&mut out_r, &(text(0) + &text(1)));
        // Appended in two pieces: printed once whole.
        let two = line(2);
        append(&current, &two[..10]);
        append(&current, &two[10..]);
        expect(&mut out_r, &text(2));
        // capsem-process's rotation: old .1 removed, link to .1, new file
        // renamed over.
        append(&current, &line(3));
        std::fs::remove_file(&rotated).unwrap();
        std::fs::hard_link(&current, &rotated).unwrap();
        let tmp = d.path().join("audit.jsonl.tmp");
        std::fs::write(&tmp, line(4)).unwrap();
        std::fs::rename(&tmp, &current).unwrap();
        expect(&mut out_r, &(text(3) + &text(4)));
        append(&current, &line(5));
        process.finish();
        let end = follower.join().unwrap().unwrap();
        assert_eq!(end, End::ProcessExited);
        let mut rest = String::new();
        out_r.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, text(5));
    }
}
