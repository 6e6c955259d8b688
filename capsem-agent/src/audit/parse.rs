//! Kernel audit records → [`AuditRecord`]s. Pure functions, no I/O.
//!
//! The kernel reports one `execve` as several text records that share a
//! header `audit(SECS.MILLIS:SERIAL):` and arrive in this order: `SYSCALL`
//! (1300: pid, ppid, uid, success, exe, tty), `EXECVE` (1309: argc and the
//! arguments, possibly split over several records), `CWD` (1307), `PATH`s,
//! `PROCTITLE`, and `EOE` (1320, end of event). [`Assembler`] groups them by
//! serial and emits one record per exec event once its `EOE` arrives.
//!
//! String values are either `"quoted"` or, when they contain a quote, a
//! space, a control or a non-ASCII byte, hex-encoded without quotes. A long
//! argument comes as `aN_len=LEN aN[0]=.. aN[1]=..`, each chunk quoted or hex
//! on its own.
//!
//! Records of different events can interleave (several CPUs exit syscalls at
//! once), and an event's serial is taken when its first record is formatted,
//! so events may complete out of serial order. The host drops any serial not
//! above the last one it stored, so completed events are held until no older
//! exec event is still open. An event whose `EOE` never comes (the kernel
//! lost records under pressure) is closed as it is once [`MAX_OPEN`] events
//! are open or [`MAX_HELD`] completed ones wait behind it.
//!
//! Bounds: at most [`MAX_AUDIT_ARGS`] arguments, each string field at most
//! [`MAX_AUDIT_FIELD`] bytes after lossy UTF-8 conversion (cut on a character
//! boundary), and the arguments together at most [`ARGV_BUDGET`] bytes so
//! that the encoded record stays far below the frame limit. Anything cut from
//! the arguments sets `argv_truncated`, as does an argument list that is
//! missing elements (lost records).

use std::collections::BTreeMap;

use capsem_proto::audit::{AuditRecord, MAX_AUDIT_ARGS, MAX_AUDIT_FIELD, MAX_AUDIT_FRAME};

/// Record types this parser reads (`include/uapi/linux/audit.h`).
pub const AUDIT_SYSCALL: u16 = 1300;
pub const AUDIT_CWD: u16 = 1307;
pub const AUDIT_EXECVE: u16 = 1309;
pub const AUDIT_EOE: u16 = 1320;
/// A few more, only so that auditd log lines naming them parse.
const AUDIT_PATH: u16 = 1302;
const AUDIT_PROCTITLE: u16 = 1327;

/// Open (incomplete) exec events kept before the oldest is closed as is.
pub const MAX_OPEN: usize = 64;
/// Completed events held behind an open older one before that one is closed
/// as is.
pub const MAX_HELD: usize = 64;
/// Bytes of all arguments together (each counted with 5 bytes of MessagePack
/// overhead): the rest of a record (exe, cwd, tty, id, numbers) stays under
/// 8 KiB, so a frame stays under [`MAX_AUDIT_FRAME`].
pub const ARGV_BUDGET: usize = MAX_AUDIT_FRAME - 8 * 1024;
/// Overhead counted per argument against [`ARGV_BUDGET`] (MessagePack str32
/// header).
const ARG_OVERHEAD: usize = 5;

/// `execve` and `execveat` numbers per audit architecture: `(AUDIT_ARCH_*,
/// [execve, execveat])`.
pub const EXEC_SYSCALLS: [(u32, [u64; 2]); 3] = [
    // AUDIT_ARCH_X86_64
    (0xC000_003E, [59, 322]),
    // AUDIT_ARCH_I386 (32-bit processes on an x86_64 kernel)
    (0x4000_0003, [11, 358]),
    // AUDIT_ARCH_AARCH64
    (0xC000_00B7, [221, 281]),
];

/// The record header: `audit(SECS.MILLIS:SERIAL)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp<'a> {
    /// `SECS.MILLIS:SERIAL`, verbatim.
    pub id: &'a str,
    pub time_ms: u64,
    pub serial: u64,
}

/// Splits `audit(SECS.MILLIS:SERIAL): BODY` into its stamp and body.
/// Trailing NULs and newlines are ignored.
pub fn split_header(text: &str) -> Option<(Stamp<'_>, &str)> {
    let text = text.trim_end_matches(['\0', '\n', '\r']);
    let rest = text.strip_prefix("audit(")?;
    let close = rest.find(')')?;
    let id = &rest[..close];
    let body = rest[close + 1..]
        .strip_prefix(':')
        .unwrap_or(&rest[close + 1..]);
    let (time, serial) = id.split_once(':')?;
    let serial: u64 = serial.parse().ok()?;
    let (secs, frac) = time.split_once('.').unwrap_or((time, "0"));
    let secs: u64 = secs.parse().ok()?;
    if frac.is_empty() || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // The kernel writes exactly three digits; be lenient about others.
    let millis = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0u64, |m, b| m * 10 + u64::from(b - b'0'));
    let time_ms = secs.checked_mul(1000)?.checked_add(millis)?;
    Some((
        Stamp {
            id,
            time_ms,
            serial,
        },
        body.trim_start(),
    ))
}

/// One line of an auditd log (`type=SYSCALL msg=audit(...): ...`): the
/// record type and the text from `audit(` on, as the netlink socket carries
/// it. Types are names (`SYSCALL`), numbers (`1300`) or `UNKNOWN[1300]`;
/// unknown names give type 0, which the assembler ignores.
pub fn log_line(line: &str) -> Option<(u16, &str)> {
    let line = line.trim_end_matches(['\0', '\n', '\r']);
    let rest = line.strip_prefix("type=")?;
    let (name, rest) = rest.split_once(' ')?;
    let text = rest.trim_start().strip_prefix("msg=")?;
    let kind = match name {
        "SYSCALL" => AUDIT_SYSCALL,
        "CWD" => AUDIT_CWD,
        "EXECVE" => AUDIT_EXECVE,
        "EOE" => AUDIT_EOE,
        "PATH" => AUDIT_PATH,
        "PROCTITLE" => AUDIT_PROCTITLE,
        other => {
            let num = other
                .strip_prefix("UNKNOWN[")
                .and_then(|s| s.strip_suffix(']'))
                .unwrap_or(other);
            num.parse().unwrap_or(0)
        }
    };
    Some((kind, text))
}

/// A field value as written: `"quoted"` or bare (a number, a word, or hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Quoted(&'a str),
    Bare(&'a str),
}

impl Value<'_> {
    /// The bytes a string field stands for: a quoted value as is, a bare
    /// value hex-decoded when it is hex (the kernel's encoding of strings
    /// with special characters), else as is (`(null)`).
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Self::Quoted(s) => s.as_bytes().to_vec(),
            Self::Bare(s) => decode_hex(s).unwrap_or_else(|| s.as_bytes().to_vec()),
        }
    }

    /// The text as written, without quotes.
    pub fn raw(&self) -> &str {
        match self {
            Self::Quoted(s) | Self::Bare(s) => s,
        }
    }
}

/// Decodes an even-length, non-empty string of hex digits.
pub fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let pairs = b.chunks_exact(2);
    if b.is_empty() || !pairs.remainder().is_empty() {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    pairs
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// The `key=value` fields of a record body, in order. auditd's enriched
/// suffix (after a 0x1d byte) is ignored; a value with an unterminated quote
/// runs to the end.
pub fn fields(body: &str) -> Fields<'_> {
    let body = body.split('\x1d').next().unwrap_or("");
    Fields { rest: body }
}

/// Iterator of [`fields`].
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Fields<'a> {
    type Item = (&'a str, Value<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let s = self.rest.trim_start_matches(' ');
            if s.is_empty() {
                self.rest = s;
                return None;
            }
            let token_end = s.find([' ', '=']).unwrap_or(s.len());
            if !s[token_end..].starts_with('=') {
                // A word without a value: skip it.
                self.rest = &s[token_end..];
                continue;
            }
            let key = &s[..token_end];
            let v = &s[token_end + 1..];
            let (value, rest) = if let Some(q) = v.strip_prefix('"') {
                match q.find('"') {
                    Some(end) => (Value::Quoted(&q[..end]), &q[end + 1..]),
                    None => (Value::Quoted(q), ""),
                }
            } else {
                let end = v.find(' ').unwrap_or(v.len());
                (Value::Bare(&v[..end]), &v[end..])
            };
            self.rest = rest;
            return Some((key, value));
        }
    }
}

/// Lossy UTF-8, cut to at most `max` bytes on a character boundary. Returns
/// the string and whether anything was cut.
pub fn bounded_string(bytes: &[u8], max: usize) -> (String, bool) {
    let mut s = String::from_utf8_lossy(bytes).into_owned();
    if s.len() <= max {
        return (s, false);
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    (s, true)
}

/// True when `(arch, syscall)` is an `execve` or `execveat`.
pub fn is_exec(arch: u32, syscall: u64) -> bool {
    EXEC_SYSCALLS
        .iter()
        .any(|(a, nrs)| *a == arch && nrs.contains(&syscall))
}

/// The `SYSCALL` record's part of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Syscall {
    pid: u32,
    ppid: u32,
    uid: u32,
    success: bool,
    exe: Vec<u8>,
    tty: String,
}

impl Default for Syscall {
    fn default() -> Self {
        Self {
            pid: 0,
            ppid: 0,
            // Unknown, as the kernel writes an unset id: never root.
            uid: u32::MAX,
            success: false,
            exe: Vec::new(),
            tty: String::new(),
        }
    }
}

/// An exec event whose `EOE` has not arrived yet.
#[derive(Debug, Clone, Default)]
struct Partial {
    id: String,
    time_ms: u64,
    syscall: Syscall,
    /// An `EXECVE` record arrived (a successful exec always has one).
    saw_execve: bool,
    argc: Option<u64>,
    /// Argument index → raw bytes, at most `MAX_AUDIT_FIELD + 1` kept per
    /// argument (enough to know it was cut).
    args: BTreeMap<usize, Vec<u8>>,
    /// An argument at index `MAX_AUDIT_ARGS` or above was seen.
    beyond: bool,
    /// Some argument had more bytes than were kept.
    cut: bool,
    cwd: Option<Vec<u8>>,
}

/// Raw bytes kept per argument.
const ARG_KEEP: usize = MAX_AUDIT_FIELD + 1;

impl Partial {
    fn syscall_fields(&mut self, body: &str) {
        for (key, value) in fields(body) {
            let num = || value.raw().parse::<u32>().ok();
            match key {
                "pid" => self.syscall.pid = num().unwrap_or(0),
                "ppid" => self.syscall.ppid = num().unwrap_or(0),
                "uid" => self.syscall.uid = num().unwrap_or(u32::MAX),
                "success" => self.syscall.success = value.raw() == "yes",
                "exe" => self.syscall.exe = value.bytes(),
                // Never hex: a device name or `(none)`.
                "tty" => self.syscall.tty = value.raw().to_owned(),
                _ => {}
            }
        }
    }

    fn execve_fields(&mut self, body: &str) {
        self.saw_execve = true;
        for (key, value) in fields(body) {
            if key == "argc" {
                self.argc = value.raw().parse().ok();
                continue;
            }
            let Some(rest) = key.strip_prefix('a') else {
                continue;
            };
            // `aN`, `aN[i]` (a chunk of a long argument) or `aN_len`.
            let (index, chunk) = match rest.split_once('[') {
                Some((n, _)) => (n, true),
                None if rest.ends_with("_len") => continue,
                None => (rest, false),
            };
            let Ok(index) = index.parse::<usize>() else {
                continue;
            };
            if index >= MAX_AUDIT_ARGS {
                self.beyond = true;
                continue;
            }
            let bytes = value.bytes();
            let arg = self.args.entry(index).or_default();
            if !chunk {
                arg.clear();
            }
            let room = ARG_KEEP.saturating_sub(arg.len());
            if bytes.len() > room {
                self.cut = true;
            }
            arg.extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
    }

    fn finish(self, serial: u64) -> AuditRecord {
        // A successful exec without its EXECVE record lost its arguments.
        let mut truncated = self.beyond || self.cut || (self.syscall.success && !self.saw_execve);
        let mut argv = Vec::with_capacity(self.args.len());
        let mut budget = ARGV_BUDGET;
        // Missing indices (lost records) become empty strings, flagged.
        let count = self.args.keys().next_back().map_or(0, |last| last + 1);
        for i in 0..count {
            let raw = match self.args.get(&i) {
                Some(raw) => raw.as_slice(),
                None => {
                    truncated = true;
                    &[]
                }
            };
            let (arg, cut) = bounded_string(raw, MAX_AUDIT_FIELD);
            truncated |= cut;
            let cost = arg.len() + ARG_OVERHEAD;
            if cost > budget {
                truncated = true;
                break;
            }
            budget -= cost;
            argv.push(arg);
        }
        if let Some(argc) = self.argc {
            if argc > argv.len() as u64 {
                truncated = true;
            }
        }
        let (exe, _) = bounded_string(&self.syscall.exe, MAX_AUDIT_FIELD);
        let cwd = self
            .cwd
            .map(|c| bounded_string(&c, MAX_AUDIT_FIELD).0)
            .unwrap_or_default();
        let tty = if self.syscall.tty.is_empty() {
            "(none)".to_owned()
        } else {
            bounded_string(self.syscall.tty.as_bytes(), MAX_AUDIT_FIELD).0
        };
        let (audit_id, _) = bounded_string(self.id.as_bytes(), MAX_AUDIT_FIELD);
        AuditRecord {
            serial,
            time_ms: self.time_ms,
            pid: self.syscall.pid,
            ppid: self.syscall.ppid,
            uid: self.syscall.uid,
            exe,
            argv,
            argv_truncated: truncated,
            cwd,
            tty,
            success: self.syscall.success,
            audit_id,
        }
    }
}

/// What [`Assembler`] did with the records it was fed, for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AssemblerStats {
    /// Text that was not `audit(SECS.MILLIS:SERIAL): ...`.
    pub malformed: u64,
    /// Exec events closed without their `EOE`.
    pub forced: u64,
    /// Records for an exec event at or below a serial already emitted.
    pub late: u64,
}

/// Groups the records of exec events by serial and emits them in serial
/// order. Everything that is not part of an exec event is ignored.
#[derive(Debug, Default)]
pub struct Assembler {
    open: BTreeMap<u64, Partial>,
    done: BTreeMap<u64, AuditRecord>,
    last_emitted: Option<u64>,
    stats: AssemblerStats,
}

impl Assembler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stats(&self) -> AssemblerStats {
        self.stats
    }

    /// Feeds one record (its netlink type and its text, `audit(...): ...`);
    /// appends the exec records that are now complete, in serial order.
    pub fn feed(&mut self, kind: u16, text: &str, out: &mut Vec<AuditRecord>) {
        let Some((stamp, body)) = split_header(text) else {
            self.stats.malformed += 1;
            return;
        };
        let serial = stamp.serial;
        let late = self.last_emitted.is_some_and(|last| serial <= last);
        match kind {
            AUDIT_SYSCALL => {
                let mut arch = None;
                let mut nr = None;
                for (key, value) in fields(body) {
                    match key {
                        "arch" => arch = u32::from_str_radix(value.raw(), 16).ok(),
                        "syscall" => nr = value.raw().parse::<u64>().ok(),
                        _ => {}
                    }
                }
                let (Some(arch), Some(nr)) = (arch, nr) else {
                    return;
                };
                if !is_exec(arch, nr) {
                    return;
                }
                if late {
                    self.stats.late += 1;
                    return;
                }
                if !self.open.contains_key(&serial) && self.open.len() >= MAX_OPEN {
                    self.force_oldest();
                }
                let partial = self.open.entry(serial).or_default();
                partial.id = stamp.id.to_owned();
                partial.time_ms = stamp.time_ms;
                partial.syscall_fields(body);
            }
            AUDIT_EXECVE => {
                if let Some(p) = self.open.get_mut(&serial) {
                    p.execve_fields(body);
                }
            }
            AUDIT_CWD => {
                if let Some(p) = self.open.get_mut(&serial) {
                    if let Some((_, v)) = fields(body).find(|(k, _)| *k == "cwd") {
                        p.cwd = Some(v.bytes());
                    }
                }
            }
            AUDIT_EOE => {
                if let Some(p) = self.open.remove(&serial) {
                    self.done.insert(serial, p.finish(serial));
                    while self.done.len() > MAX_HELD && !self.open.is_empty() {
                        self.force_oldest();
                    }
                }
            }
            _ => {}
        }
        self.flush(out);
    }

    /// Closes every open event as it is and emits everything, in order. For
    /// the end of a finite source.
    pub fn finish(&mut self, out: &mut Vec<AuditRecord>) {
        while !self.open.is_empty() {
            self.force_oldest();
        }
        self.flush(out);
    }

    fn force_oldest(&mut self) {
        if let Some((serial, p)) = self.open.pop_first() {
            self.stats.forced += 1;
            self.done.insert(serial, p.finish(serial));
        }
    }

    /// Emits completed events older than every open one.
    fn flush(&mut self, out: &mut Vec<AuditRecord>) {
        while let Some((&serial, _)) = self.done.first_key_value() {
            if self.open.keys().next().is_some_and(|&open| open < serial) {
                break;
            }
            if let Some((serial, rec)) = self.done.pop_first() {
                self.last_emitted = Some(serial);
                out.push(rec);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HDR: &str = "audit(1700000000.123:";

    fn syscall(serial: u64, extra: &str) -> String {
        format!(
            "{HDR}{serial}): arch=c000003e syscall=59 success=yes exit=0 a0=55d0c8a0f2a0 \
             a1=55d0c8a0e9c0 a2=55d0c8a0d010 a3=8 items=2 ppid=812 pid=900 auid=4294967295 \
             uid=0 gid=0 euid=0 suid=0 fsuid=0 egid=0 sgid=0 fsgid=0 tty=pts0 \
             ses=4294967295 comm=\"ls\" exe=\"/usr/bin/ls\" {extra}key=(null)"
        )
    }

    fn feed(asm: &mut Assembler, lines: &[(u16, String)]) -> Vec<AuditRecord> {
        let mut out = Vec::new();
        for (kind, text) in lines {
            asm.feed(*kind, text, &mut out);
        }
        out
    }

    fn event(serial: u64, execve: &str) -> Vec<(u16, String)> {
        vec![
            (AUDIT_SYSCALL, syscall(serial, "")),
            (AUDIT_EXECVE, format!("{HDR}{serial}): {execve}")),
            (AUDIT_CWD, format!("{HDR}{serial}): cwd=\"/root\"")),
            (
                AUDIT_PATH,
                format!("{HDR}{serial}): item=0 name=\"/usr/bin/ls\" inode=1 nametype=NORMAL"),
            ),
            (
                AUDIT_PROCTITLE,
                format!("{HDR}{serial}): proctitle=6C73002D6C"),
            ),
            (AUDIT_EOE, format!("{HDR}{serial}): ")),
        ]
    }

    #[test]
    fn header_and_log_lines() {
        let (stamp, body) = split_header("audit(1700000000.123:45): argc=1 a0=\"x\"\0").unwrap();
        assert_eq!(stamp.id, "1700000000.123:45");
        assert_eq!(stamp.time_ms, 1_700_000_000_123);
        assert_eq!(stamp.serial, 45);
        assert_eq!(body, "argc=1 a0=\"x\"");
        assert_eq!(split_header("audit(1.5:2): ").unwrap().0.time_ms, 1500);
        for bad in [
            "",
            "audit(",
            "audit(1.2)",
            "audit(x.1:2): ",
            "type=EOE",
            "audit(1.a:2):",
        ] {
            assert!(split_header(bad).is_none(), "{bad:?}");
        }
        let (kind, text) =
            log_line("type=EXECVE msg=audit(1700000000.123:45): argc=1 a0=\"ls\"\n").unwrap();
        assert_eq!(kind, AUDIT_EXECVE);
        assert_eq!(text, "audit(1700000000.123:45): argc=1 a0=\"ls\"");
        assert_eq!(
            log_line("type=1320 msg=audit(1.0:1): ").unwrap().0,
            AUDIT_EOE
        );
        assert_eq!(
            log_line("type=UNKNOWN[1307] msg=audit(1.0:1): ").unwrap().0,
            AUDIT_CWD
        );
        assert_eq!(log_line("type=USER_LOGIN msg=audit(1.0:1): ").unwrap().0, 0);
        assert!(log_line("garbage").is_none());
    }

    #[test]
    fn field_values_quoted_bare_and_hex() {
        let got: Vec<_> = fields("a=1 b=\"x y\" c=414243 d=(null) lone e=\"open").collect();
        assert_eq!(
            got,
            vec![
                ("a", Value::Bare("1")),
                ("b", Value::Quoted("x y")),
                ("c", Value::Bare("414243")),
                ("d", Value::Bare("(null)")),
                ("e", Value::Quoted("open")),
            ]
        );
        assert_eq!(Value::Bare("414243").bytes(), b"ABC");
        assert_eq!(Value::Bare("(null)").bytes(), b"(null)");
        // Odd length or not hex: kept as written.
        assert_eq!(Value::Bare("abc").bytes(), b"abc");
        assert_eq!(Value::Quoted("414243").bytes(), b"414243");
        // auditd's enriched part is not parsed.
        let got: Vec<_> = fields("uid=0\x1dUID=\"root\"").collect();
        assert_eq!(got, vec![("uid", Value::Bare("0"))]);
    }

    #[test]
    fn a_plain_exec() {
        let mut asm = Assembler::new();
        let out = feed(
            &mut asm,
            &event(45, "argc=3 a0=\"ls\" a1=\"-l\" a2=\"/tmp\""),
        );
        assert_eq!(
            out,
            vec![AuditRecord {
                serial: 45,
                time_ms: 1_700_000_000_123,
                pid: 900,
                ppid: 812,
                uid: 0,
                exe: "/usr/bin/ls".into(),
                argv: vec!["ls".into(), "-l".into(), "/tmp".into()],
                argv_truncated: false,
                cwd: "/root".into(),
                tty: "pts0".into(),
                success: true,
                audit_id: "1700000000.123:45".into(),
            }]
        );
        assert_eq!(asm.stats(), AssemblerStats::default());
    }

    #[test]
    fn hex_args_with_spaces_and_quotes_and_hex_cwd_and_exe() {
        // a1 = `hello world`, a2 = `say "hi"`, a3 = "caf\xc3\xa9" (UTF-8),
        // a4 = a lone 0xff byte.
        let mut lines = event(
            7,
            "argc=5 a0=\"echo\" a1=68656C6C6F20776F726C64 a2=7361792022686922 \
             a3=636166C3A9 a4=FF",
        );
        lines[0].1 = syscall(7, "").replace(
            "exe=\"/usr/bin/ls\"",
            "exe=2F746D702F6D792070726F67", // /tmp/my prog
        );
        lines[2].1 = format!("{HDR}7): cwd=2F686F6D652F6120622F22632022"); // /home/a b/"c "
        let out = feed(&mut Assembler::new(), &lines);
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert_eq!(
            r.argv,
            ["echo", "hello world", "say \"hi\"", "café", "\u{fffd}"]
        );
        assert_eq!(r.exe, "/tmp/my prog");
        assert_eq!(r.cwd, "/home/a b/\"c \"");
        assert!(!r.argv_truncated);
    }

    #[test]
    fn long_args_in_chunks_and_over_several_records() {
        let chunk = "41".repeat(600);
        let serial = 9;
        let lines = vec![
            (AUDIT_SYSCALL, syscall(serial, "")),
            (
                AUDIT_EXECVE,
                format!("{HDR}{serial}): argc=3 a0=\"x\" a1_len=1200 a1[0]={chunk}"),
            ),
            (
                AUDIT_EXECVE,
                format!("{HDR}{serial}): a1[1]={chunk} a2=\"tail\""),
            ),
            (AUDIT_EOE, format!("{HDR}{serial}): ")),
        ];
        let out = feed(&mut Assembler::new(), &lines);
        let r = &out[0];
        assert_eq!(r.argv.len(), 3);
        assert_eq!(r.argv[0], "x");
        // 1200 bytes cut to MAX_AUDIT_FIELD.
        assert_eq!(r.argv[1], "A".repeat(MAX_AUDIT_FIELD));
        assert_eq!(r.argv[2], "tail");
        assert!(r.argv_truncated);
        assert_eq!(r.cwd, "", "no CWD record");
    }

    #[test]
    fn many_args_are_capped() {
        let args: String = (0..300).map(|i| format!(" a{i}=\"arg{i}\"")).collect();
        let out = feed(&mut Assembler::new(), &event(3, &format!("argc=300{args}")));
        let r = &out[0];
        assert_eq!(r.argv.len(), MAX_AUDIT_ARGS);
        assert_eq!(r.argv[255], "arg255");
        assert!(r.argv_truncated);

        let args: String = (0..10).map(|i| format!(" a{i}=\"arg{i}\"")).collect();
        let out = feed(&mut Assembler::new(), &event(3, &format!("argc=10{args}")));
        assert_eq!(out[0].argv.len(), 10);
        assert!(!out[0].argv_truncated);
    }

    #[test]
    fn the_worst_case_record_fits_in_a_frame() {
        use capsem_proto::audit::AuditToHost;
        use capsem_proto::frame::AuditGuest;
        use capsem_proto::Codec;
        // 256 arguments of 1024 invalid bytes each: lossy conversion triples
        // them, the bounds cut them to 1024, the budget stops the list.
        let hex = "FF".repeat(MAX_AUDIT_FIELD);
        let args: String = (0..MAX_AUDIT_ARGS)
            .map(|i| format!(" a{i}={hex}"))
            .collect();
        let mut lines = event(11, &format!("argc={MAX_AUDIT_ARGS}{args}"));
        let long = "41".repeat(4096);
        lines[0].1 = syscall(11, "").replace("exe=\"/usr/bin/ls\"", &format!("exe={long}"));
        lines[2].1 = format!("{HDR}11): cwd={long}");
        let out = feed(&mut Assembler::new(), &lines);
        let r = &out[0];
        assert!(r.argv_truncated);
        assert!(r.argv.len() < MAX_AUDIT_ARGS);
        assert!(r.argv.iter().all(|a| a.len() <= MAX_AUDIT_FIELD));
        assert_eq!(r.exe.len(), MAX_AUDIT_FIELD);
        assert_eq!(r.cwd.len(), MAX_AUDIT_FIELD);
        let frame = Codec::<AuditGuest>::encode(&AuditToHost::Record(r.clone())).unwrap();
        assert!(frame.len() <= MAX_AUDIT_FRAME);
    }

    #[test]
    fn a_failed_exec_has_no_execve_record() {
        let serial = 12;
        let lines = vec![
            (
                AUDIT_SYSCALL,
                syscall(serial, "")
                    .replace("success=yes exit=0", "success=no exit=-2")
                    .replace("exe=\"/usr/bin/ls\"", "exe=\"/usr/bin/bash\""),
            ),
            (AUDIT_CWD, format!("{HDR}{serial}): cwd=\"/root\"")),
            (
                AUDIT_PATH,
                format!("{HDR}{serial}): item=0 name=\"/nope\" nametype=UNKNOWN"),
            ),
            (AUDIT_EOE, format!("{HDR}{serial}): ")),
        ];
        let out = feed(&mut Assembler::new(), &lines);
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert!(!r.success);
        assert_eq!(r.exe, "/usr/bin/bash");
        assert!(r.argv.is_empty());
        assert!(!r.argv_truncated);
        assert_eq!(r.cwd, "/root");
    }

    #[test]
    fn a_gap_in_the_arguments_is_flagged() {
        let mut lines = event(13, "argc=2 a1=\"second\"");
        lines.remove(2); // no CWD either
        let out = feed(&mut Assembler::new(), &lines);
        let r = &out[0];
        assert_eq!(r.argv, ["", "second"]);
        assert!(r.argv_truncated);
    }

    #[test]
    fn tty_none_and_missing_fields() {
        let serial = 14;
        let lines = vec![
            (
                AUDIT_SYSCALL,
                format!("{HDR}{serial}): arch=c000003e syscall=322 success=yes exit=0 tty=(none)"),
            ),
            (AUDIT_EOE, format!("{HDR}{serial}): ")),
        ];
        let out = feed(&mut Assembler::new(), &lines);
        let r = &out[0];
        assert_eq!(r.tty, "(none)");
        assert_eq!((r.pid, r.ppid, r.uid), (0, 0, u32::MAX));
        assert_eq!(r.exe, "");
        assert!(r.argv.is_empty());
        assert!(r.argv_truncated, "a successful exec lost its EXECVE record");
    }

    #[test]
    fn other_syscalls_and_record_types_are_ignored() {
        let mut asm = Assembler::new();
        let lines = vec![
            (
                AUDIT_SYSCALL,
                syscall(20, "").replace("syscall=59", "syscall=44"),
            ),
            (AUDIT_EOE, format!("{HDR}20): ")),
            // The same number on another architecture is not an exec.
            (
                AUDIT_SYSCALL,
                syscall(21, "").replace("arch=c000003e", "arch=c00000b7"),
            ),
            (AUDIT_EOE, format!("{HDR}21): ")),
            (
                1305,
                format!("{HDR}22): op=add_rule key=(null) list=4 res=1"),
            ),
            (AUDIT_EXECVE, format!("{HDR}23): argc=1 a0=\"orphan\"")),
            (AUDIT_EOE, format!("{HDR}23): ")),
            (AUDIT_SYSCALL, "not a record".to_owned()),
        ];
        assert!(feed(&mut asm, &lines).is_empty());
        assert_eq!(asm.stats().malformed, 1);
        // i386 and aarch64 execs count.
        assert!(is_exec(0x4000_0003, 11));
        assert!(is_exec(0xC000_00B7, 221));
        assert!(!is_exec(0xC000_003E, 221));
    }

    #[test]
    fn interleaved_events_come_out_in_serial_order() {
        let a = event(100, "argc=1 a0=\"a\"");
        let b = event(101, "argc=1 a0=\"b\"");
        let mut asm = Assembler::new();
        let mut out = Vec::new();
        // a's SYSCALL, then all of b, then the rest of a.
        asm.feed(a[0].0, &a[0].1, &mut out);
        for (k, t) in &b {
            asm.feed(*k, t, &mut out);
        }
        assert!(out.is_empty(), "b waits for the older a");
        for (k, t) in &a[1..] {
            asm.feed(*k, t, &mut out);
        }
        let serials: Vec<u64> = out.iter().map(|r| r.serial).collect();
        assert_eq!(serials, [100, 101]);
        assert_eq!(out[0].argv, ["a"]);
        assert_eq!(out[1].argv, ["b"]);
    }

    #[test]
    fn an_event_without_eoe_is_closed_once_enough_newer_ones_complete() {
        let mut asm = Assembler::new();
        let mut out = Vec::new();
        let lost = event(1, "argc=1 a0=\"lost-eoe\"");
        for (k, t) in &lost[..lost.len() - 1] {
            asm.feed(*k, t, &mut out);
        }
        for serial in 2..(2 + MAX_HELD as u64) {
            for (k, t) in event(serial, "argc=1 a0=\"x\"") {
                asm.feed(k, &t, &mut out);
            }
        }
        assert!(out.is_empty());
        for (k, t) in event(2 + MAX_HELD as u64, "argc=1 a0=\"x\"") {
            asm.feed(k, &t, &mut out);
        }
        assert_eq!(out.len(), MAX_HELD + 2);
        assert_eq!(out[0].argv, ["lost-eoe"]);
        assert_eq!(out[0].cwd, "/root");
        assert!(out.windows(2).all(|w| w[0].serial < w[1].serial));
        assert_eq!(asm.stats().forced, 1);
        // Its EOE arriving now is late and ignored; so is a replayed SYSCALL.
        asm.feed(AUDIT_EOE, &lost[lost.len() - 1].1, &mut out);
        asm.feed(AUDIT_SYSCALL, &lost[0].1, &mut out);
        assert_eq!(out.len(), MAX_HELD + 2);
        assert_eq!(asm.stats().late, 1);
    }

    #[test]
    fn too_many_open_events_close_the_oldest() {
        let mut asm = Assembler::new();
        let mut out = Vec::new();
        for serial in 1..=(MAX_OPEN as u64 + 1) {
            asm.feed(AUDIT_SYSCALL, &syscall(serial, ""), &mut out);
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].serial, 1);
        asm.finish(&mut out);
        assert_eq!(out.len(), MAX_OPEN + 1);
        assert_eq!(asm.stats().forced, MAX_OPEN as u64 + 1);
    }

    #[test]
    fn bounded_string_cuts_on_a_char_boundary() {
        assert_eq!(bounded_string(b"abc", 3), ("abc".to_owned(), false));
        assert_eq!(bounded_string("aé".as_bytes(), 2), ("a".to_owned(), true));
        assert_eq!(bounded_string(&[0xff], 3), ("\u{fffd}".to_owned(), false));
        assert_eq!(
            bounded_string(&[0xff, 0xff], 4),
            ("\u{fffd}".to_owned(), true)
        );
    }
}
