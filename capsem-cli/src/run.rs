//! `capsem run`: one command in a temporary VM, from start to teardown.
//!
//! Order of events: the request is checked (a refused environment variable
//! or an oversized command is exit 125 before anything starts), home and VM
//! directory, capsem-process started with `--exec` and its ready line
//! awaited, `Exec` on `ctl.sock`, the exec loop ([`crate::exec`]), then on
//! every path: connection closed, capsem-process reaped (killed by process
//! group after a grace period), VM directory removed. Locals are declared so
//! that Rust's reverse drop order does exactly that.

use std::path::{Path, PathBuf};

use capsem_proto::exec::{check_env, check_start, ExecError};
use capsem_proto::ipc::ClientToProcess;

use crate::attach::AttachError;
use crate::cli::{AccelChoice, RunArgs, Vmm};
use crate::exec::{self, ExecEnd};
use crate::exit;
use crate::tempvm::{self, Attached, Started, TempVmError};

/// Why `capsem run` failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Request(#[from] ExecError),
    #[error("environment variable {0} is not set here (from -e {0})")]
    EnvUnset(String),
    #[error("the value of environment variable {0} is not UTF-8")]
    EnvNotUtf8(String),
    #[error(transparent)]
    Start(#[from] TempVmError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("session lost: {0}")]
    SessionLost(String),
    #[error("cannot write the audit log {path}")]
    AuditLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl RunError {
    /// The documented exit code (see `exit.rs`).
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::SessionLost(_) => exit::SESSION_LOST,
            _ => exit::CAPSEM_FAILED,
        }
    }
}

/// `-e KEY=VAL` or `-e KEY` (the value from capsem's environment), checked.
pub fn parse_env(
    items: &[String],
    lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<Vec<(String, String)>, RunError> {
    let mut env = Vec::with_capacity(items.len());
    for item in items {
        let (name, value) = match item.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => {
                capsem_proto::exec::check_env_name(item)?;
                let value = lookup(item).ok_or_else(|| RunError::EnvUnset(item.clone()))?;
                let value = value
                    .into_string()
                    .map_err(|_| RunError::EnvNotUtf8(item.clone()))?;
                (item.clone(), value)
            }
        };
        check_env(&name, &value)?;
        env.push((name, value));
    }
    Ok(env)
}

/// `-t`: the PTY size, from capsem's own terminal (80x24 without one).
pub fn tty_size() -> (u16, u16) {
    use std::os::fd::AsFd;
    crate::terminal::size_or_default(std::io::stdin().as_fd())
}

/// `-t` with a terminal on stdin: raw mode for the command's lifetime, so
/// keys (Ctrl-C, Ctrl-D) reach the command's PTY as bytes.
pub fn raw_if_tty(tty: bool) -> Result<Option<crate::terminal::RawGuard>, RunError> {
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    if !tty || !crate::terminal::is_tty(stdin.as_fd()) {
        return Ok(None);
    }
    crate::terminal::RawGuard::enter(stdin.as_fd())
        .map(Some)
        .map_err(|e| RunError::SessionLost(format!("cannot set the terminal to raw mode: {e}")))
}

/// `--audit-log FILE`: made absolute (capsem-process, which appends the
/// records at teardown, runs elsewhere) and opened for appending (created
/// with mode 0600) now, so a path that cannot be written fails with exit
/// 125 before anything starts rather than after the command ran.
pub fn prepare_audit_log(path: &Path) -> Result<PathBuf, RunError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RunError::AuditLog { path, source }
    };
    let abs = std::path::absolute(path).map_err(err(path))?;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&abs)
        .map_err(err(&abs))?;
    Ok(abs)
}

/// Runs one command in a temporary VM and returns capsem's exit code.
pub fn run(
    home_flag: Option<&Path>,
    vmm: Vmm,
    accel: AccelChoice,
    args: RunArgs,
) -> Result<u8, RunError> {
    let audit_log = args.audit_log;
    let args = args.cmd;
    let env = parse_env(&args.env, |k| std::env::var_os(k))?;
    check_start(&args.command, &env, args.workdir.as_deref(), args.timeout)?;
    // capsem-process appends the guest's audit records there at teardown.
    let audit_log = audit_log.as_deref().map(prepare_audit_log).transpose()?;
    let request = ClientToProcess::Exec {
        argv: args.command,
        env,
        workdir: args.workdir,
        timeout_ms: args.timeout,
        tty: args.tty.then(tty_size),
    };
    let mut vm = match tempvm::start(home_flag, vmm, accel, true, audit_log.as_deref())? {
        Started::Ready(vm) => vm,
        Started::Interrupted(code) => return Ok(code),
    };

    let mut session = match vm.attach(&request)? {
        Attached::Session(s) => s,
        Attached::Interrupted(code) => return Ok(code),
    };
    let raw = raw_if_tty(args.tty)?;
    let end = exec::run(&mut session, &mut vm.signals);
    drop(raw);
    drop(session);
    drop(vm);
    match end {
        ExecEnd::Exited(code) => Ok(code),
        ExecEnd::Lost(reason) => Err(RunError::SessionLost(reason)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_items() {
        let lookup = |k: &str| (k == "HERE").then(|| std::ffi::OsString::from("v"));
        assert_eq!(
            parse_env(&["A=1".into(), "B=".into(), "C=x=y".into()], lookup).unwrap(),
            vec![
                ("A".into(), "1".into()),
                ("B".into(), String::new()),
                ("C".into(), "x=y".into())
            ]
        );
        assert_eq!(
            parse_env(&["HERE".into()], lookup).unwrap(),
            vec![("HERE".into(), "v".into())]
        );
        assert!(matches!(
            parse_env(&["GONE".into()], lookup),
            Err(RunError::EnvUnset(_))
        ));
        let e = parse_env(&["LD_PRELOAD=/x.so".into()], lookup).unwrap_err();
        assert_eq!(e.exit_code(), 125);
        assert!(e.to_string().contains("LD_PRELOAD"), "{e}");
        assert!(parse_env(&["1A=x".into()], lookup).is_err());
    }

    #[test]
    fn audit_log_is_absolute_and_writable_before_the_start() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("audit.jsonl");
        std::fs::write(&file, "kept\n").unwrap();
        assert_eq!(prepare_audit_log(&file).unwrap(), file);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "kept\n");
        // Created in the current directory: removed before any assert.
        let abs = prepare_audit_log(Path::new("capsem-run-test-audit.jsonl")).unwrap();
        let removed = std::fs::remove_file(&abs);
        assert!(abs.is_absolute() && abs.ends_with("capsem-run-test-audit.jsonl"));
        removed.unwrap();
        let e = prepare_audit_log(&d.path().join("missing/dir/a.jsonl")).unwrap_err();
        assert_eq!(e.exit_code(), 125);
        assert!(e.to_string().contains("missing/dir/a.jsonl"), "{e}");
    }
}
