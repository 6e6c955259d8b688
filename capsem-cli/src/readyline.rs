//! capsem-process's ready line: `ready\n` or `error: <reason>\n` on the
//! inherited pipe (see [`crate::spawn`]), bounded and made one safe line.

use nix::sys::signal::Signal;

/// Longest ready line accepted.
pub const MAX_READY_LINE: usize = 4096;

/// What capsem-process reported on the ready pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyOutcome {
    /// The guest bridge is up and `ctl.sock` listens.
    Ready,
    /// It could not start; the reason is one line of text.
    Failed(String),
    /// capsem received this signal while waiting.
    Interrupted(Signal),
}

/// Interprets one ready line (without its newline).
pub fn parse_ready_line(line: &[u8]) -> ReadyOutcome {
    let text = String::from_utf8_lossy(line);
    // One line on our stderr, whatever the peer wrote.
    let clean: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean == "ready" {
        ReadyOutcome::Ready
    } else if let Some(reason) = clean.strip_prefix("error:") {
        let reason = reason.trim();
        ReadyOutcome::Failed(if reason.is_empty() {
            "capsem-process failed without a reason".into()
        } else {
            reason.to_string()
        })
    } else {
        ReadyOutcome::Failed(format!(
            "capsem-process sent an unexpected ready line: {clean:?}"
        ))
    }
}

/// Accumulates ready-pipe bytes until a whole line or EOF.
#[derive(Debug, Default)]
pub(crate) struct ReadyLine {
    buf: Vec<u8>,
}

impl ReadyLine {
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Option<ReadyOutcome> {
        self.buf.extend_from_slice(bytes);
        if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            return Some(parse_ready_line(&self.buf[..nl]));
        }
        if self.buf.len() > MAX_READY_LINE {
            return Some(ReadyOutcome::Failed(
                "capsem-process sent an overlong ready line".into(),
            ));
        }
        None
    }

    pub(crate) fn eof(&self) -> ReadyOutcome {
        if self.buf.iter().all(u8::is_ascii_whitespace) {
            ReadyOutcome::Failed("capsem-process exited before it was ready".into())
        } else {
            parse_ready_line(&self.buf)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines() {
        assert_eq!(parse_ready_line(b"ready"), ReadyOutcome::Ready);
        assert_eq!(
            parse_ready_line(b"error: the qemu backend is not available yet"),
            ReadyOutcome::Failed("the qemu backend is not available yet".into())
        );
        assert!(
            matches!(parse_ready_line(b"hello"), ReadyOutcome::Failed(r) if r.contains("unexpected"))
        );
        assert!(
            matches!(parse_ready_line(b"error:\x1b[2Jx"), ReadyOutcome::Failed(r) if !r.contains('\x1b'))
        );
    }

    #[test]
    fn ready_line_accumulates_and_bounds() {
        let mut l = ReadyLine::default();
        assert_eq!(l.push(b"rea"), None);
        assert_eq!(l.push(b"dy\nignored"), Some(ReadyOutcome::Ready));
        let mut l = ReadyLine::default();
        assert!(matches!(
            l.push(&[b'x'; MAX_READY_LINE + 1]),
            Some(ReadyOutcome::Failed(_))
        ));
        let l = ReadyLine::default();
        assert!(matches!(l.eof(), ReadyOutcome::Failed(r) if r.contains("exited before")));
        let mut l = ReadyLine::default();
        assert_eq!(l.push(b"error: no kvm"), None);
        assert_eq!(l.eof(), ReadyOutcome::Failed("no kvm".into()));
    }
}
