//! `capsem`: run an interactive shell inside a hardware-isolated Linux VM,
//! like `docker run --rm -it`.
//!
//! `capsem [--home DIR] [--vmm qemu|none] shell` creates a temporary VM under
//! `<home>/vms/tmp-<16 hex>/`, starts `capsem-process` for it, attaches this
//! terminal to the guest shell over `<vm-dir>/ctl.sock`, and destroys the VM
//! when the shell exits. Home: `--home`, else `$CAPSEM_HOME`, else
//! `~/.capsem`. Backend: `--vmm`, else `$CAPSEM_VMM`, else `qemu`.
//! capsem-process: `$CAPSEM_PROCESS_BIN` if set, else `capsem-process` beside
//! this executable (so an installed `capsem` finds its helper from any
//! directory; `scripts/install.sh` puts them side by side).
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
//! Modules (`main` only parses and hands over to [`cmd::dispatch`]):
//!
//! * [`cli`]: clap definitions (subcommands as an enum, global flags).
//! * [`cmd`]: one module per command, and the dispatcher.
//! * [`exit`]: [`exit::Exit`], the one exit-code type every command returns.
//! * [`error`]: [`error::CliError`], the one error type, and its one-line
//!   rendering.
//! * [`context`]: [`context::Ctx`] (home, backend, accelerator), loading and
//!   locking a VM by name.
//! * [`home`]: home resolution, `vms/` and VM directories, VM ids.
//! * [`vms`]: the VM directories read and their states.
//! * [`vmctl`]: booting, adopting and stopping a persistent VM's processes.
//! * [`sweep`]: cleaning up what crashes left, before every VM command.
//! * [`tempvm`]: starting a temporary VM (`shell` and `run`).
//! * [`spawn`]: starting capsem-process, the ready pipe, reaping by pidfd
//!   and killing by process group.
//! * [`attach`]: the ctl.sock handshake and the shell's poll loop.
//! * [`request`]: `run`/`exec` requests: `-e`, `-t`, `--audit-log`.
//! * [`exec_loop`]: `run`'s and `exec`'s poll loop: stdin, separate
//!   stdout/stderr, the status.
//! * [`follow`]: following a file until a process exits (`logs` and
//!   `audit --follow`).
//! * [`auditfmt`]: audit records printed safely.
//! * [`checks`]: `doctor`'s host checks; [`health`]: its report lines.
//! * [`probe`]: finding host programs, `--version` with a time bound.
//! * [`image`]: the guest image directory and its manifest.
//! * [`output`]: writing a result to stdout.
//! * [`terminal`]: window size, raw mode guard, panic hook.
//! * [`signals`]: signals as signalfd events.
//! * [`progress`]: the "starting" indicator on a terminal stderr.

mod attach;
mod auditfmt;
mod checks;
mod cli;
mod cmd;
mod context;
mod error;
mod exec_loop;
mod exit;
mod follow;
mod health;
mod home;
mod image;
mod output;
mod probe;
mod progress;
mod request;
mod signals;
mod spawn;
mod sweep;
mod tempvm;
mod terminal;
#[cfg(test)]
mod testutil;
mod vmctl;
mod vms;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;

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
    match cmd::dispatch(cli) {
        Ok(exit) => exit.into(),
        Err(e) => {
            eprintln!("capsem: {}", error::one_line_chain(&e));
            e.exit().into()
        }
    }
}
