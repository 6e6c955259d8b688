//! `capsem`: run an interactive shell, or a command, inside a
//! hardware-isolated Linux VM, like `docker run --rm -it`.
//!
//! Usage (global flags go before or after the command):
//!
//! ```text
//! capsem [--home DIR] [--vmm qemu|none] [--accel auto|kvm|tcg] shell [--disk-size SIZE] [--image REF [--registry-auth FILE]] [-v HOST_DIR:GUEST_PATH[:rw|ro|overlay]]...
//! capsem [...] run [-t] [--timeout SECS] [-e KEY=VAL]... [-w DIR] [--audit-log FILE] [--disk-size SIZE] [--image REF] [-v SHARE]... -- CMD [ARG...]
//! capsem [...] create NAME [--cpus N] [--memory MIB] [--disk-size SIZE] [--image REF] [-v SHARE]...
//! capsem [...] shell NAME                  # Ctrl-] or ~. detaches, the shell keeps running
//! capsem [...] exec NAME [-t] [--timeout SECS] [-e KEY=VAL]... [-w DIR] -- CMD [ARG...]
//! capsem [...] list [--json] | inspect NAME | diff NAME [--json] | logs NAME [--follow] [--source process|serial]
//! capsem [...] stop NAME [--grace SECS] | start NAME | rm [--force] NAME
//! capsem [...] audit NAME [--follow] [--json]
//! capsem [...] cp NAME:PATH HOST_PATH|- | cp HOST_PATH|- NAME:PATH
//! capsem [--home DIR] doctor
//! capsem [--home DIR] image ls [--json] | pull REF [--registry-auth FILE] | rm REF | import FILE
//! capsem completions bash|zsh|fish|elvish|powershell
//! capsem man
//! ```
//!
//! `shell` without NAME creates a temporary VM under
//! `<home>/vms/tmp-<16 hex>/`, starts `capsem-process` for it, attaches this
//! terminal to the guest shell over `<vm-dir>/ctl.sock`, and destroys the VM
//! when the shell exits; `run` does the same for one command (like `docker
//! run --rm`): its stdout and stderr byte for byte on capsem's, stdin
//! forwarded with its EOF. `create` makes a persistent VM that `shell NAME`,
//! `exec NAME`, `stop`, `start` and `rm` act on. Home: `--home`, else
//! `$CAPSEM_HOME`, else `~/.capsem`. Backend: `--vmm`, else `$CAPSEM_VMM`,
//! else `qemu`. `--accel` (else `$CAPSEM_ACCEL`, else `auto`) is passed to
//! capsem-process, which decides what `auto` means. capsem-process:
//! `$CAPSEM_PROCESS_BIN` if set, else `capsem-process` beside this
//! executable; capsem-process runs the `--vmm none` agent from
//! `$CAPSEM_AGENT_BIN`, else beside itself; the guest image is
//! `$CAPSEM_IMAGE_DIR`, else `<home>/images/default`. So an installed
//! `capsem` (`scripts/install.sh` puts the three side by side) works from
//! any directory.
//!
//! Options before `run`'s or `exec`'s command are capsem's: an unknown one
//! is a usage error (exit 125), never taken as the command; after the
//! command's name, or after `--`, every word is the command's.
//!
//! Exit status ([`exit::Exit`], also in `capsem --help`):
//!
//! * the shell's (or command's) own exit status;
//! * 124 when `run`/`exec --timeout` expired (SIGTERM to the command's
//!   process group, SIGKILL 2 s later);
//! * 126 not executable, 127 not found (`run`/`exec`);
//! * 128 + N when signal N killed it, or capsem itself got SIGHUP, SIGTERM
//!   (or SIGINT before the shell ran; for `run`, the command's process
//!   group is stopped first);
//! * 125 when capsem failed before the shell ran or refused the request
//!   (usage, capsem-process missing, the VM did not start, a home it
//!   cannot read, `-e LD_PRELOAD=...`);
//! * 255 when the session was lost without an exit status, or `~.` at
//!   the start of a line destroyed the temporary VM (or left `exec -t`;
//!   [`escape`]);
//! * `doctor`: 0 when nothing is missing, 1 otherwise (see [`health`] for
//!   the output format);
//! * `cp`: 0 when done, 1 when the copy failed, 125 on a usage error or a
//!   VM that is unknown or not running.
//!
//! Every failure is one line on stderr starting with `capsem: ` (a usage
//! error is clap's message).
//!
//! When stdin is not a terminal, its EOF is forwarded as a Ctrl-D (0x04)
//! byte, and again every 500 ms until the session ends (a pipe at EOF stays
//! at EOF), so a shell at its prompt sees end-of-input and exits. SIGINT is
//! forwarded as Ctrl-C (0x03).
//!
//! Modules (`main` only parses and dispatches to one of [`cmd`]):
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
//! * [`vmimage`]: a VM's OCI image (`--image`), resolved, recorded, looked up.
//! * [`netflags`]: `--net` and `--net-policy`, checked and recorded.
//! * [`netaudit`]: `audit --net`, the connection records printed safely.
//! * [`share`]: `-v HOST_DIR:GUEST_PATH[:MODE]` parsed and checked.
//! * [`publish`]: `-p [HOST_IP:]HOST_PORT:GUEST_PORT` parsed and checked.
//! * [`overlaydiff`]: what the guest changed on an overlay share.
//! * [`sweep`]: cleaning up what crashes left, before every VM command.
//! * [`tempvm`]: starting a temporary VM (`shell` and `run`).
//! * [`readyline`]: capsem-process's ready line, parsed and bounded.
//! * [`spawn`]: starting capsem-process, the ready pipe, reaping by pidfd
//!   and killing by process group.
//! * [`attach`]: the ctl.sock handshake and the shell's poll loop.
//! * [`escape`]: the ssh-style `~.` escapes typed on a terminal.
//! * [`request`]: `run`/`exec` requests: `-e`, `-t`, `--audit-log`.
//! * [`lifetime`]: a persistent VM's lifetime limits on capsem-process's
//!   command line.
//! * [`lost`]: why a session ended without a status ([`lost::Lost`]).
//! * [`exec_loop`]: `run`'s and `exec`'s poll loop: stdin, separate
//!   stdout/stderr, the status.
//! * [`cpplan`]: `cp`'s arguments and Docker's rules for them;
//!   [`transfer`]: its guest commands over the exec channel and the host's
//!   tar stream; [`unpack`]: the guest's tar stream unpacked as hostile.
//! * [`follow`]: following a file until a process exits (`logs` and
//!   `audit --follow`).
//! * [`auditfmt`]: audit records printed safely.
//! * [`checks`]: `doctor`'s host checks; [`health`]: its report lines;
//!   [`jailcheck`]: its lines on the VMM jail and host limits.
//! * [`probe`]: finding host programs, `--version` with a time bound.
//! * [`image`]: the guest image directory and its manifest.
//! * [`output`]: writing a result to stdout.
//! * [`terminal`]: window size, raw mode guard, panic hook.
//! * [`signals`]: signals as signalfd events.
//! * [`progress`]: the "starting" indicator on a terminal stderr.
//! * [`pullbar`]: `image pull`'s and `import`'s progress bar on a terminal
//!   stderr.

mod attach;
mod auditfmt;
mod checks;
mod cli;
mod cmd;
mod context;
mod cpplan;
mod error;
mod escape;
mod exec_loop;
mod exit;
mod follow;
mod health;
mod home;
mod image;
mod jailcheck;
mod lifetime;
mod lost;
mod netaudit;
mod netflags;
mod output;
mod overlaydiff;
mod probe;
mod progress;
mod publish;
mod pullbar;
mod readyline;
mod request;
mod share;
mod signals;
mod spawn;
mod sweep;
mod tempvm;
mod terminal;
#[cfg(test)]
mod testutil;
mod transfer;
mod unpack;
mod vmctl;
mod vmimage;
mod vms;

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{AccelChoice, Cli, Command, Vmm};
use crate::context::Ctx;
use crate::error::CliError;
use crate::exit::Exit;

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
    match dispatch(cli) {
        Ok(exit) => exit.into(),
        Err(e) => {
            eprintln!("capsem: {}", error::one_line_chain(&e));
            e.exit().into()
        }
    }
}

/// The VM commands: the home resolved, then the sweep, then the command.
fn vm_command(
    home: Option<&Path>,
    vmm: Vmm,
    accel: AccelChoice,
    run: impl FnOnce(&Ctx) -> Result<Exit, CliError>,
) -> Result<Exit, CliError> {
    let ctx = Ctx::new(home, vmm, accel)?;
    crate::sweep::sweep(&ctx);
    run(&ctx)
}

/// Runs the parsed command line's command.
fn dispatch(cli: Cli) -> Result<Exit, CliError> {
    let Cli {
        home,
        vmm,
        accel,
        command,
    } = cli;
    let home = home.as_deref();
    match command {
        Command::Shell { name: None, new } => cmd::shell::run_temporary(home, vmm, accel, &new),
        Command::Run(args) => cmd::run::run(home, vmm, accel, args),
        Command::Doctor => Ok(cmd::doctor::run(home, vmm, accel)),
        Command::Completions { shell } => cmd::completions::run(shell),
        Command::Man => cmd::man::run(),
        Command::Image { command } => {
            let ctx = Ctx::new(home, vmm, accel)?;
            cmd::image::run(&ctx, command)
        }
        Command::Create(args) => vm_command(home, vmm, accel, |ctx| cmd::create::run(ctx, &args)),
        Command::Shell {
            name: Some(name),
            new,
        } => vm_command(home, vmm, accel, |ctx| {
            cmd::shell::run_named(ctx, &name, &new)
        }),
        Command::Start { name } => vm_command(home, vmm, accel, |ctx| cmd::start::run(ctx, &name)),
        Command::Stop { name, grace } => {
            vm_command(home, vmm, accel, |ctx| cmd::stop::run(ctx, &name, grace))
        }
        Command::List { json } => vm_command(home, vmm, accel, |ctx| cmd::list::run(ctx, json)),
        Command::Inspect { name } => {
            vm_command(home, vmm, accel, |ctx| cmd::inspect::run(ctx, &name))
        }
        Command::Rm { force, name } => {
            vm_command(home, vmm, accel, |ctx| cmd::rm::run(ctx, &name, force))
        }
        Command::Logs {
            name,
            follow,
            source,
        } => vm_command(home, vmm, accel, |ctx| {
            cmd::logs::run(ctx, &name, follow, source)
        }),
        Command::Exec(args) => vm_command(home, vmm, accel, |ctx| cmd::exec::run(ctx, args)),
        Command::Cp { src, dst } => {
            vm_command(home, vmm, accel, |ctx| cmd::cp::run(ctx, &src, &dst))
        }
        Command::Diff { name, json } => {
            vm_command(home, vmm, accel, |ctx| cmd::diff::run(ctx, &name, json))
        }
        Command::Audit {
            name,
            follow,
            json,
            net,
        } => vm_command(home, vmm, accel, |ctx| {
            if net {
                return cmd::audit::run_net(ctx, &name, json);
            }
            cmd::audit::run(ctx, &name, follow, json)
        }),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    const MAIN: &str = include_str!("main.rs");
    const CMD: &str = include_str!("cmd/mod.rs");

    /// The names declared by `mod NAME;` / `pub mod NAME;` lines.
    fn declared(src: &str) -> Vec<&str> {
        src.lines()
            .filter_map(|l| {
                l.trim_start_matches("pub ")
                    .strip_prefix("mod ")?
                    .strip_suffix(';')
            })
            .collect()
    }

    #[test]
    fn the_module_map_names_every_module() {
        let modules = declared(MAIN);
        assert!(modules.len() > 20, "{modules:?}");
        for m in modules {
            if m == "testutil" {
                continue;
            }
            assert!(
                MAIN.contains(&format!("[`{m}`]")),
                "main.rs's module map misses {m}"
            );
        }
    }

    #[test]
    fn the_usage_block_and_cmd_cover_every_subcommand() {
        let usage: Vec<&str> = MAIN
            .lines()
            .skip_while(|l| *l != "//! ```text")
            .skip(1)
            .take_while(|l| *l != "//! ```")
            .collect();
        let commands = declared(CMD);
        for sub in crate::cli::Cli::command().get_subcommands() {
            let name = sub.get_name();
            assert!(
                usage
                    .iter()
                    .any(|l| l.split_whitespace().any(|w| w == name)),
                "main.rs's usage misses {name}"
            );
            assert!(commands.contains(&name), "cmd/ has no module {name}");
        }
    }
}
