//! What `run` and `exec` share before a command starts: `-e` items read
//! and checked, the `-t` size and raw mode, the `--audit-log` file, and
//! the `Exec` request built from them ([`exec_request`]).

use std::path::{Path, PathBuf};

use capsem_proto::exec::{check_env, check_start};
use capsem_proto::ipc::ClientToProcess;

use crate::cli::CommandArgs;
use crate::error::CliError;
use crate::lost::Lost;

/// The checked `Exec` request for `args` (a refused variable or an
/// oversized command is an error, exit 125, before anything starts).
pub fn exec_request(args: CommandArgs) -> Result<(ClientToProcess, bool), CliError> {
    let env = parse_env(&args.env, |k| std::env::var_os(k))?;
    check_start(&args.command, &env, args.workdir.as_deref(), args.timeout)?;
    let tty = args.tty;
    let request = ClientToProcess::Exec {
        argv: args.command,
        env,
        workdir: args.workdir,
        timeout_ms: args.timeout,
        tty: tty.then(tty_size),
    };
    Ok((request, tty))
}

/// `-e KEY=VAL` or `-e KEY` (the value from capsem's environment), checked.
pub fn parse_env(
    items: &[String],
    lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<Vec<(String, String)>, CliError> {
    let mut env = Vec::with_capacity(items.len());
    for item in items {
        let (name, value) = match item.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => {
                capsem_proto::exec::check_env_name(item)?;
                let value = lookup(item).ok_or_else(|| CliError::EnvUnset(item.clone()))?;
                let value = value
                    .into_string()
                    .map_err(|_| CliError::EnvNotUtf8(item.clone()))?;
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
pub fn raw_if_tty(tty: bool) -> Result<Option<crate::terminal::RawGuard>, CliError> {
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    if !tty || !crate::terminal::is_tty(stdin.as_fd()) {
        return Ok(None);
    }
    crate::terminal::RawGuard::enter(stdin.as_fd())
        .map(Some)
        .map_err(|e| CliError::SessionLost(Lost::RawMode(e)))
}

/// `--audit-log FILE`: made absolute (capsem-process, which appends the
/// records at teardown, runs elsewhere) and opened for appending (created
/// with mode 0600) now, so a path that cannot be written fails with exit
/// 125 before anything starts rather than after the command ran.
pub fn prepare_audit_log(path: &Path) -> Result<PathBuf, CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CliError::AuditLog { path, source }
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
            Err(CliError::EnvUnset(_))
        ));
        let e = parse_env(&["LD_PRELOAD=/x.so".into()], lookup).unwrap_err();
        assert_eq!(e.exit().code(), 125);
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
        assert_eq!(e.exit().code(), 125);
        assert!(e.to_string().contains("missing/dir/a.jsonl"), "{e}");
    }
}
