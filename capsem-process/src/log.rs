//! `tracing` to `<vm-dir>/process.log`: one line per event, RFC 3339 UTC
//! timestamps, no colour codes. `CAPSEM_LOG` overrides the filter.

use std::error::Error;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing_subscriber::fmt::time::UtcTime;
use tracing_subscriber::EnvFilter;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot open the log file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadySet,
}

/// Installs the global subscriber writing to `path` (appended, mode 0600).
pub fn init(path: &Path) -> Result<(), LogError> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| LogError::Open {
            path: path.into(),
            source,
        })?;
    let filter = EnvFilter::try_from_env("CAPSEM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_timer(UtcTime::rfc_3339())
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(filter)
        .with_writer(Mutex::new(file))
        .try_init()
        .map_err(|_| LogError::AlreadySet)
}

/// An error and its causes on one line: `outer: cause: root cause`.
pub fn chain(err: &dyn Error) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] io::Error);

    #[test]
    fn chain_joins_causes() {
        let e = Outer(io::Error::other("inner\nline"));
        assert_eq!(chain(&e), "outer: inner line");
    }
}
