//! `capsem`: run an interactive shell inside a hardware-isolated Linux VM,
//! like `docker run --rm -it`.
//!
//! `capsem [--home DIR] [--vmm qemu|none] shell` creates a temporary VM under
//! `<home>/vms/tmp-<16 hex>/`, starts `capsem-process` for it, attaches this
//! terminal to the guest shell over `<vm-dir>/ctl.sock`, and destroys the VM
//! when the shell exits. Home: `--home`, else `$CAPSEM_HOME`, else
//! `~/.capsem`. Backend: `--vmm`, else `$CAPSEM_VMM`, else `qemu`.
//! capsem-process: `$CAPSEM_PROCESS_BIN` if set, else `capsem-process` beside
//! this executable.
//!
//! Exit status (also in `capsem --help`):
//!
//! * the shell's exit status;
//! * 128 + N when signal N killed the shell, or capsem itself got SIGHUP,
//!   SIGTERM (or SIGINT before the shell ran);
//! * 125 when capsem failed before the shell ran (usage, capsem-process
//!   missing, the VM did not start);
//! * 255 when the session was lost without an exit status.
//!
//! Every failure is one line on stderr starting with `capsem: `.
//!
//! `--accel auto|kvm|tcg` (else `$CAPSEM_ACCEL`, else `auto`) is passed to
//! capsem-process as `--accel` for `--vmm qemu`; capsem-process decides what
//! `auto` means.
//!
//! `capsem run [--timeout SECS] [-e KEY=VAL]... [--workdir DIR] -- CMD [ARG...]`
//! runs one command in a temporary VM (like `docker run --rm`): its stdout
//! and stderr byte for byte on capsem's, stdin forwarded with its EOF, and
//! capsem's exit status is the command's: 124 when `--timeout` expired, 126
//! not executable, 127 not found, 128 + N killed by signal N (or capsem got
//! signal N: the command's process group is stopped first), 125 when capsem
//! failed or refused the request (e.g. `-e LD_PRELOAD=...`), 255 when the
//! session was lost.
//!
//! `capsem doctor` checks the host (see [`doctor`] for the output format)
//! and exits 0 when nothing is missing, 1 otherwise.
//!
//! When stdin is not a terminal, its EOF is forwarded as one Ctrl-D (0x04)
//! byte, so a shell at its prompt sees end-of-input and exits. SIGINT is
//! forwarded as Ctrl-C (0x03).
//!
//! Modules:
//!
//! * [`cli`]: clap definitions (subcommands as an enum, global flags).
//! * [`shell`]: the `shell` command: the temporary VM's whole lifetime.
//! * [`run`]: the `run` command: one command in a temporary VM.
//! * [`exec`]: `run`'s poll loop: stdin, separate stdout/stderr, the status.
//! * [`doctor`]: the `doctor` command: one line per host check, with fixes.
//! * [`accel`]: what `--accel auto` would pick (for `doctor` only).
//! * [`probe`]: finding host programs, `--version` with a time bound.
//! * [`image`]: the guest image directory and its manifest.
//! * [`home`]: home resolution, `vms/` and VM directories, VM ids.
//! * [`spawn`]: starting capsem-process, the ready pipe, reaping by pidfd
//!   and killing by process group.
//! * [`attach`]: the ctl.sock handshake and the poll loop.
//! * [`terminal`]: window size, raw mode guard, panic hook.
//! * [`signals`]: signals as signalfd events.
//! * [`progress`]: the "starting" indicator on a terminal stderr.
//! * [`exit`]: the exit codes.

mod attach;
mod audit;
mod cli;
mod doctor;
mod exec;
mod exec_named;
mod exit;
mod home;
mod image;
mod inspect;
mod list;
mod logs;
mod persist;
mod probe;
mod progress;
mod rm;
mod run;
mod shell;
mod signals;
mod spawn;
mod sweep;
mod tempvm;
mod terminal;
mod vms;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

/// `error: cause: cause`, on one line.
pub(crate) fn one_line_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn main() -> ExitCode {
    terminal::install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::CAPSEM_FAILED
            } else {
                0
            });
        }
    };
    let result = match cli.command {
        Command::Shell { name: None } => shell::run(cli.home.as_deref(), cli.vmm, cli.accel),
        Command::Doctor => Ok(doctor::run(cli.home.as_deref(), cli.vmm, cli.accel)),
        Command::Run(args) => {
            return match run::run(cli.home.as_deref(), cli.vmm, cli.accel, args) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("capsem: {}", one_line_chain(&e));
                    ExitCode::from(e.exit_code())
                }
            };
        }
        other => {
            return match persist::run(cli.home.as_deref(), cli.vmm, cli.accel, other) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("capsem: {}", one_line_chain(&e));
                    ExitCode::from(e.exit_code())
                }
            };
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("capsem: {}", one_line_chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_is_one_line() {
        let e = home::HomeError::Create {
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        let line = one_line_chain(&e);
        assert!(line.starts_with("cannot create /x: "), "{line}");
        assert!(!line.contains('\n'));
    }
}
