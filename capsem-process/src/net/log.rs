//! `net.jsonl`: one JSON line per connection or name the guest tried,
//! allowed or denied, appended with a single `write(2)` and rotated like
//! `audit.jsonl` (before a line would take it over [`DEFAULT_MAX_BYTES`] it
//! becomes `net.jsonl.1`, and a new empty file takes the name atomically).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// `net.jsonl` is rotated before it would grow past this.
pub const DEFAULT_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// Overrides [`DEFAULT_MAX_BYTES`] (tests), at least 1024.
pub const MAX_BYTES_ENV: &str = "CAPSEM_NET_MAX_BYTES";

/// One attempt. Fields are only ever added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetRecord {
    /// RFC 3339, UTC (host clock), when the attempt arrived.
    pub time: String,
    /// `resolve` (a DNS name the guest asked for), `connect`, or `packet`
    /// (packets the guest's firewall dropped: UDP other than DNS, ICMP,
    /// raw IP, IPv6; `count` says how many).
    pub kind: &'static str,
    /// The name the guest resolved (a `connect` to an address literal: null).
    pub name: Option<String>,
    /// The TLS SNI or HTTP Host the guest sent first.
    pub seen: Option<String>,
    /// The address the guest dialled (a synthetic one for a name).
    pub guest_ip: Option<String>,
    /// The address dialled on the host, when one was.
    pub address: Option<String>,
    pub port: Option<u16>,
    /// `allow` or `deny`.
    pub verdict: &'static str,
    /// The rule that allowed it, or why it was denied.
    pub reason: String,
    /// Bytes from the guest to the server, and back.
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub duration_ms: u64,
    /// A summary's: how many questions it stands for; a `packet` record's:
    /// how many packets (absent on the record of one attempt).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// A `packet` record's IP protocol (`udp`, `icmp`, ...; absent on the
    /// others).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proto: Option<String>,
}

impl NetRecord {
    /// The summary of `count` questions of `kind` refused over the rate.
    pub fn throttled(kind: &'static str, reason: String, count: u64) -> Self {
        Self {
            time: capsem_host::vmstate::now_rfc3339(),
            kind,
            name: None,
            seen: None,
            guest_ip: None,
            address: None,
            port: None,
            verdict: "deny",
            reason,
            bytes_out: 0,
            bytes_in: 0,
            duration_ms: 0,
            count: Some(count),
            proto: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetLogError {
    #[error("cannot {what} {path}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot encode a net record")]
    Json(#[source] serde_json::Error),
}

fn err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> NetLogError {
    let path = path.to_path_buf();
    move |source| NetLogError::File { what, path, source }
}

/// `net.jsonl`, opened for appending.
#[derive(Debug)]
pub struct NetLog {
    path: PathBuf,
    rotated: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
}

fn open_append(path: &Path) -> Result<File, NetLogError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(err("open", path))
}

impl NetLog {
    pub fn open(root: &Path) -> Result<Self, NetLogError> {
        let max = std::env::var(MAX_BYTES_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|n| *n >= 1024)
            .unwrap_or(DEFAULT_MAX_BYTES);
        Self::open_with(root, max)
    }

    fn open_with(root: &Path, max_bytes: u64) -> Result<Self, NetLogError> {
        let path = root.join("net.jsonl");
        let file = open_append(&path)?;
        let size = file.metadata().map_err(err("inspect", &path))?.len();
        Ok(Self {
            rotated: root.join("net.jsonl.1"),
            path,
            file,
            size,
            max_bytes,
        })
    }

    /// Appends one record as one line (rotating first when it would not fit).
    pub fn append(&mut self, record: &NetRecord) -> Result<(), NetLogError> {
        let mut line = serde_json::to_vec(record).map_err(NetLogError::Json)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file
            .write_all(&line)
            .map_err(err("append to", &self.path))?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// Appends the stored records (`net.jsonl.1`, then `net.jsonl`) of the
    /// VM directory `root` to `dest` (`--audit-log`, after the exec ones);
    /// the bytes copied.
    pub fn export(root: &Path, dest: &Path) -> Result<u64, crate::jsonl::JsonlError> {
        crate::jsonl::export(&root.join("net.jsonl.1"), &root.join("net.jsonl"), dest)
    }

    /// The full file becomes `net.jsonl.1` through a hard link, then an
    /// empty file is renamed over the name, so it never goes missing.
    fn rotate(&mut self) -> Result<(), NetLogError> {
        let tmp = self.path.with_extension("jsonl.tmp");
        for p in [&self.rotated, &tmp] {
            match fs::remove_file(p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err("remove", p)(e)),
                _ => {}
            }
        }
        fs::hard_link(&self.path, &self.rotated).map_err(err("link", &self.rotated))?;
        let file = open_append(&tmp)?;
        fs::rename(&tmp, &self.path).map_err(err("rename", &tmp))?;
        self.file = file;
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u64) -> NetRecord {
        NetRecord {
            time: "2026-01-02T03:04:05Z".into(),
            kind: "connect",
            name: Some("a.b".into()),
            seen: None,
            guest_ip: Some("198.18.0.1".into()),
            address: Some("127.0.0.1:80".into()),
            port: Some(80),
            verdict: "allow",
            reason: "allow=a.b".into(),
            bytes_out: n,
            bytes_in: 0,
            duration_ms: 1,
            count: None,
            proto: None,
        }
    }

    #[test]
    fn appends_lines_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = NetLog::open_with(dir.path(), 1024).unwrap();
        log.append(&record(1)).unwrap();
        let text = fs::read_to_string(dir.path().join("net.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["verdict"], "allow");
        assert_eq!(v["bytes_out"], 1);
        assert!(
            v.get("count").is_none(),
            "one attempt's record has no count"
        );
        for n in 2..20 {
            log.append(&record(n)).unwrap();
        }
        let cur = fs::read_to_string(dir.path().join("net.jsonl")).unwrap();
        let old = fs::read_to_string(dir.path().join("net.jsonl.1")).unwrap();
        assert!(cur.len() <= 1024 && old.len() <= 1024);
        let lines = cur.lines().count() + old.lines().count();
        assert!((4..19).contains(&lines), "only two files are kept: {lines}");
        let last: serde_json::Value = serde_json::from_str(cur.lines().last().unwrap()).unwrap();
        assert_eq!(last["bytes_out"], 19);
        // Reopened (an adopted guest): appends after what is there.
        let mut again = NetLog::open_with(dir.path(), 1024).unwrap();
        again.append(&record(20)).unwrap();
        let cur = fs::read_to_string(dir.path().join("net.jsonl")).unwrap();
        assert!(cur.lines().last().unwrap().contains("\"bytes_out\":20"));
    }
}
