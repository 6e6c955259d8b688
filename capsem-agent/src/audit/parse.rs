//! Kernel audit records → [`AuditRecord`](capsem_proto::audit::AuditRecord)s. Pure functions, no I/O.
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
//! Bounds: at most [`MAX_AUDIT_ARGS`](capsem_proto::audit::MAX_AUDIT_ARGS) arguments, each string field at most
//! [`MAX_AUDIT_FIELD`](capsem_proto::audit::MAX_AUDIT_FIELD) bytes after lossy UTF-8 conversion (cut on a character
//! boundary), and the arguments together at most [`ARGV_BUDGET`] bytes so
//! that the encoded record stays far below the frame limit. Anything cut from
//! the arguments sets `argv_truncated`, as does an argument list that is
//! missing elements (lost records).

use capsem_proto::audit::MAX_AUDIT_FRAME;

/// Record types this parser reads (`include/uapi/linux/audit.h`).
pub const AUDIT_SYSCALL: u16 = 1300;
pub const AUDIT_CWD: u16 = 1307;
pub const AUDIT_EXECVE: u16 = 1309;
pub const AUDIT_EOE: u16 = 1320;
/// A few more, only so that auditd log lines naming them parse.
pub(super) const AUDIT_PATH: u16 = 1302;
pub(super) const AUDIT_PROCTITLE: u16 = 1327;

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
pub(super) const ARG_OVERHEAD: usize = 5;

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
pub(super) struct Syscall {
    pub(super) pid: u32,
    pub(super) ppid: u32,
    pub(super) uid: u32,
    pub(super) success: bool,
    pub(super) exe: Vec<u8>,
    pub(super) tty: String,
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

pub use super::event::Assembler;

#[cfg(test)]
mod tests {
    use super::*;

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
