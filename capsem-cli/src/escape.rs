//! ssh-style escapes on an interactive session's terminal stdin (`shell`,
//! and `run -t` / `exec -t` through [`crate::exec_loop`]).
//!
//! Recognised only when stdin is a terminal, and only at the start of a
//! line (the first input of the session, or right after a CR or LF), as
//! ssh does:
//!
//! | keys | effect |
//! |---|---|
//! | `~.` | temporary VM: destroy it at once, exit 255; persistent VM: detach at once, it keeps running |
//! | `~?` | list the escapes (on stderr) |
//! | `~~` | send one `~` |
//! | `~` then any other key | both are sent |
//!
//! The CLI acts on `~.` by itself: it does not wait for capsem-process or
//! the guest to answer, so it works on a wedged guest.
//!
//! A persistent VM's session also detaches on Ctrl-] anywhere in the input
//! ([`DETACH_KEY`]); [`Scanner`] reports it as [`Escape::Detach`].

/// The escape character.
pub const ESCAPE_CHAR: u8 = b'~';

/// Ctrl-]: detaches from a persistent VM's shell (as telnet and docker do).
pub const DETACH_KEY: u8 = 0x1d;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// `~.`: leave now, without waiting for anyone.
    Disconnect,
    /// `~?`: list the escapes.
    Help,
    /// Ctrl-] on a persistent VM: detach after sending what came before.
    Detach,
}

/// The help `~?` prints, one escape a line.
pub const HELP: &[&str] = &[
    "supported escapes (at the start of a line):",
    "~.   temporary VM: destroy it and exit 255; capsem shell NAME: detach (the VM keeps running)",
    "~?   this list",
    "~~   send one ~",
];

/// `~?`: prints [`HELP`] on stderr (raw mode: CR LF line ends).
pub fn print_help() {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    for line in HELP {
        let _ = write!(err, "\r\n{line}");
    }
    let _ = write!(err, "\r\n");
    let _ = err.flush();
}

/// Where the scanner is in the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line: a `~` here may begin an escape.
    LineStart,
    /// Inside a line: everything passes through.
    InLine,
    /// A `~` at the start of a line was held back; the next key decides.
    Tilde,
}

/// Finds escapes in terminal input, keeping its place across reads.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// Ctrl-] detaches (a persistent VM's session).
    detach_key: bool,
}

impl Scanner {
    /// A scanner at the start of the first line.
    pub fn new(detach_key: bool) -> Self {
        Self {
            state: State::LineStart,
            detach_key,
        }
    }

    /// Scans `input`, appending the bytes to send to `out`, up to and
    /// including the first escape. Returns how many bytes of `input` were
    /// consumed and the escape, if one ended the scan; call again with the
    /// rest.
    pub fn scan(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Option<Escape>) {
        for (i, &b) in input.iter().enumerate() {
            if self.detach_key && b == DETACH_KEY {
                if self.state == State::Tilde {
                    out.push(ESCAPE_CHAR);
                }
                self.state = State::InLine;
                return (i + 1, Some(Escape::Detach));
            }
            match self.state {
                State::Tilde => match b {
                    b'.' => {
                        self.state = State::InLine;
                        return (i + 1, Some(Escape::Disconnect));
                    }
                    b'?' => {
                        self.state = State::LineStart;
                        return (i + 1, Some(Escape::Help));
                    }
                    ESCAPE_CHAR => {
                        out.push(ESCAPE_CHAR);
                        self.state = State::InLine;
                    }
                    other => {
                        out.extend_from_slice(&[ESCAPE_CHAR, other]);
                        self.state = after(other);
                    }
                },
                State::LineStart if b == ESCAPE_CHAR => self.state = State::Tilde,
                State::LineStart | State::InLine => {
                    out.push(b);
                    self.state = after(b);
                }
            }
        }
        (input.len(), None)
    }
}

/// The state after sending `b`.
fn after(b: u8) -> State {
    if b == b'\r' || b == b'\n' {
        State::LineStart
    } else {
        State::InLine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans the reads in turn, as the session does: up to an escape that
    /// ends it. Returns what was sent and the escapes seen.
    fn run(scanner: &mut Scanner, reads: &[&[u8]]) -> (Vec<u8>, Vec<Escape>) {
        let mut out = Vec::new();
        let mut seen = Vec::new();
        for read in reads {
            let mut rest = *read;
            while !rest.is_empty() {
                let (used, esc) = scanner.scan(rest, &mut out);
                rest = &rest[used..];
                seen.extend(esc);
                if matches!(esc, Some(Escape::Detach | Escape::Disconnect)) {
                    return (out, seen);
                }
            }
        }
        (out, seen)
    }

    #[test]
    fn tilde_dot_as_first_input_disconnects() {
        let (out, seen) = run(&mut Scanner::new(false), &[b"~."]);
        assert_eq!(out, b"");
        assert_eq!(seen, [Escape::Disconnect]);
    }

    #[test]
    fn tilde_dot_after_enter_disconnects() {
        for eol in [&b"\r"[..], b"\n"] {
            let input = [b"ls", eol, b"~."].concat();
            let (out, seen) = run(&mut Scanner::new(false), &[&input]);
            assert_eq!(out, [b"ls", eol].concat());
            assert_eq!(seen, [Escape::Disconnect]);
        }
    }

    #[test]
    fn tilde_dot_split_across_reads_disconnects() {
        let (out, seen) = run(&mut Scanner::new(false), &[b"a\r", b"~", b"."]);
        assert_eq!(out, b"a\r");
        assert_eq!(seen, [Escape::Disconnect]);
    }

    #[test]
    fn tilde_dot_mid_line_passes_through() {
        let (out, seen) = run(&mut Scanner::new(false), &[b"echo a~.b\r"]);
        assert_eq!(out, b"echo a~.b\r");
        assert!(seen.is_empty());
    }

    #[test]
    fn double_tilde_sends_one() {
        let (out, seen) = run(&mut Scanner::new(false), &[b"~~.\r"]);
        assert_eq!(out, b"~.\r");
        assert!(seen.is_empty());
    }

    #[test]
    fn tilde_then_other_key_sends_both() {
        let (out, seen) = run(&mut Scanner::new(false), &[b"~x", b"\r~", b"\r~."]);
        assert_eq!(out, b"~x\r~\r");
        assert_eq!(seen, [Escape::Disconnect]);
    }

    #[test]
    fn help_then_disconnect() {
        let (out, seen) = run(&mut Scanner::new(false), &[b"~?~."]);
        assert_eq!(out, b"");
        assert_eq!(seen, [Escape::Help, Escape::Disconnect]);
    }

    #[test]
    fn detach_key_only_when_asked() {
        let (out, seen) = run(&mut Scanner::new(true), &[b"ab\x1dcd"]);
        assert_eq!(out, b"ab");
        assert_eq!(seen, [Escape::Detach]);
        let (out, seen) = run(&mut Scanner::new(false), &[b"ab\x1dcd"]);
        assert_eq!(out, b"ab\x1dcd");
        assert!(seen.is_empty());
    }

    #[test]
    fn a_held_tilde_is_sent_before_a_detach() {
        let (out, seen) = run(&mut Scanner::new(true), &[b"~\x1d"]);
        assert_eq!(out, b"~");
        assert_eq!(seen, [Escape::Detach]);
    }
}
