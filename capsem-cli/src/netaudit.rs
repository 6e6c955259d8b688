//! `capsem audit NAME --net`: the guest's connection records
//! (`<vm-dir>/net.jsonl.1`, then `net.jsonl`; docs/network.md), one line
//! each:
//!
//! ```text
//! 2026-12-02T06:20:40Z allow connect test.capsem:8080 seen=test.capsem -> 127.0.0.1:8080 out=84 in=61 12ms # allow=127.0.0.1:8080
//! 2026-12-02T06:20:41Z deny packet 192.0.2.1:9 proto=udp count=3 # 'UDP other than DNS goes nowhere (dropped in the guest)'
//! ```
//!
//! Names and the SNI/Host come from the guest: quoted and escaped like the
//! execve records ([`crate::auditfmt::quote`]); `--json` prints the stored
//! lines with dangerous characters as JSON escapes. A line that does not
//! parse is skipped with a warning on stderr.

use std::io::{self, Read, Write};
use std::path::Path;

use serde_json::Value;

use crate::auditfmt::{quote, safe_json, AuditError};

/// The files, oldest first.
pub const FILES: [&str; 2] = ["net.jsonl.1", "net.jsonl"];
/// A stored file larger than this is cut (rotation keeps them at 8 MiB).
const MAX_FILE: u64 = 64 << 20;

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(quote)
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// One record as one line (no newline); `None` if it is not a record.
pub fn format(v: &Value) -> Option<String> {
    let time = v.get("time")?.as_str()?;
    let verdict = v.get("verdict")?.as_str()?;
    let kind = v.get("kind")?.as_str()?;
    let port = v.get("port").and_then(Value::as_u64);
    let target = text(v, "name")
        .or_else(|| text(v, "guest_ip"))
        .unwrap_or_else(|| "-".into());
    let mut line = format!(
        "{} {} {} {}",
        quote(time),
        quote(verdict),
        quote(kind),
        target
    );
    if let Some(p) = port {
        line.push_str(&format!(":{p}"));
    }
    if let Some(seen) = text(v, "seen") {
        line.push_str(&format!(" seen={seen}"));
    }
    if let Some(addr) = text(v, "address") {
        line.push_str(&format!(" -> {addr}"));
    }
    if let Some(proto) = text(v, "proto") {
        line.push_str(&format!(" proto={proto}"));
    }
    if let Some(count) = v.get("count").and_then(Value::as_u64) {
        line.push_str(&format!(" count={count}"));
    }
    if kind == "connect" {
        line.push_str(&format!(
            " out={} in={} {}ms",
            num(v, "bytes_out"),
            num(v, "bytes_in"),
            num(v, "duration_ms")
        ));
    }
    if let Some(reason) = text(v, "reason") {
        line.push_str(&format!(" # {reason}"));
    }
    Some(line)
}

/// Prints every stored record of the VM directory `dir`.
pub fn print(dir: &Path, json: bool, out: &mut dyn Write) -> Result<(), AuditError> {
    for name in FILES {
        let path = dir.join(name);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(AuditError::Open { path, source }),
        };
        let mut bytes = Vec::new();
        file.take(MAX_FILE)
            .read_to_end(&mut bytes)
            .map_err(|source| AuditError::Read {
                path: path.clone(),
                source,
            })?;
        let text = String::from_utf8_lossy(&bytes);
        // A last line without its newline is still being written.
        let complete = text.rsplit_once('\n').map_or("", |(head, _)| head);
        for line in complete.lines().filter(|l| !l.is_empty()) {
            let parsed = serde_json::from_str::<Value>(line).ok();
            let Some(formatted) = parsed.as_ref().and_then(format) else {
                eprintln!(
                    "capsem: warning: skipping a line of {} that is not a record",
                    path.display()
                );
                continue;
            };
            let shown = if json { safe_json(line) } else { formatted };
            writeln!(out, "{shown}").map_err(AuditError::Write)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_both_files_in_order_and_escapes_the_guests_words() {
        let dir = tempfile::tempdir().unwrap();
        let old = r#"{"time":"2026-12-02T06:20:40Z","kind":"resolve","name":"nope.capsem","seen":null,"guest_ip":null,"address":null,"port":null,"verdict":"deny","reason":"no rule allows it","bytes_out":0,"bytes_in":0,"duration_ms":0}"#;
        let new = r#"{"time":"2026-12-02T06:20:41Z","kind":"connect","name":"a.b","seen":"x\u001b[2Jy","guest_ip":"198.18.0.1","address":"127.0.0.1:80","port":80,"verdict":"allow","reason":"allow=a.b","bytes_out":3,"bytes_in":4,"duration_ms":5}"#;
        std::fs::write(dir.path().join("net.jsonl.1"), format!("{old}\nnot json\n")).unwrap();
        let packet = r#"{"time":"2026-12-02T06:20:42Z","kind":"packet","name":null,"seen":null,"guest_ip":"192.0.2.1","address":null,"port":9,"verdict":"deny","reason":"UDP other than DNS goes nowhere","bytes_out":0,"bytes_in":0,"duration_ms":0,"count":3,"proto":"udp"}"#;
        std::fs::write(
            dir.path().join("net.jsonl"),
            format!("{new}\n{packet}\n{{\"partial"),
        )
        .unwrap();
        let mut out = Vec::new();
        print(dir.path(), false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "2026-12-02T06:20:40Z deny resolve nope.capsem # 'no rule allows it'",
                "2026-12-02T06:20:41Z allow connect a.b:80 seen=$'x\\x1b[2Jy' -> 127.0.0.1:80 out=3 in=4 5ms # allow=a.b",
                "2026-12-02T06:20:42Z deny packet 192.0.2.1:9 proto=udp count=3 # 'UDP other than DNS goes nowhere'",
            ]
        );
        let mut out = Vec::new();
        print(dir.path(), true, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(!text.contains('\u{1b}'));
        let v: Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(v["seen"], "x\u{1b}[2Jy", "the same JSON value");
    }

    #[test]
    fn no_files_prints_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Vec::new();
        print(dir.path(), false, &mut out).unwrap();
        assert!(out.is_empty());
    }
}
