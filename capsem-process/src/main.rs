//! `capsem-process`: the host process of one VM.
//!
//! ```text
//! capsem-process --vm-dir DIR --vm-id ID --vmm none|qemu [--temporary]
//!                [--ready-fd N] [--heartbeat-ms 1000] [--missed-pongs 3]
//!                [--boot-timeout-ms N] [--exec] [--audit-log FILE]
//!                [--net VALUE]... [--share S]... [--publish IP:HOST:GUEST]...
//! ```
//!
//! With `--exec` the agent runs one command instead of a shell: the client
//! attaches with `Exec{argv, env, workdir, timeout_ms}` and gets
//! `ExecOutput`* then `ExecExit`; the guest's exec connection
//! (`vsock.sock_5005`) is relayed by [`exec`].
//!
//! It is a child subreaper, owns the VM directory (0700), listens on
//! `ctl.sock` (0600, peers of our uid only) and on `vsock.sock_5000` /
//! `vsock.sock_5001` for the guest, starts the guest (`--vmm none`: the
//! agent as a child, `$CAPSEM_AGENT_BIN` or `capsem-agent` beside this
//! binary, token in `$CAPSEM_TOKEN`), bridges the shell to one attached
//! client, and tears everything down when the session ends.
//!
//! Exit status: `0` after an orderly teardown (whatever ended the session:
//! shell exit, shutdown request, lost session, signal, client gone), `1` on
//! a runtime error or when the guest failed to come up (the ready fd then
//! got `error: <reason>`), `2` on a usage error.
//!
//! Modules:
//! * [`config`]: command line.
//! * [`vmdir`]: the VM directory and its paths.
//! * [`log`]: `process.log`, RFC 3339 timestamps, one line per event.
//! * [`ready`]: the ready fd protocol.
//! * [`reaper`]: the only `waitpid` caller (SIGCHLD-driven), spawning children.
//! * [`vmm`]: guest backends (`none`, `qemu`).
//! * [`cgroup`]: the host's cgroup v2 limits on a VM's daemons.
//! * [`accept`]: the one accept loop (bounded, backoff, stop, joined).
//! * [`guest`]: control/terminal/exec listeners and their hello checks.
//! * [`bridge`]: one connection generation's tasks (terminal frames in,
//!   keystrokes out); its writers own the long-lived receivers.
//! * [`exec`]: the exec relay of a `--exec` VM (`capsem run`).
//! * [`audit`]: the audit port (`vsock.sock_5006`) and `audit.jsonl`.
//! * [`net`]: the network port (`vsock.sock_5007`): the guest's egress
//!   decided with `--net`, relayed, and recorded in `net.jsonl`.
//! * [`publish`]: published ports (`--publish`): a host TCP listener
//!   each, every connection relayed to the guest's 127.0.0.1:PORT through
//!   vhost-device-vsock's `CONNECT` to the agent's port 5008.
//! * [`heartbeat`]: ping/pong bookkeeping.
//! * [`jsonl`]: what `audit.jsonl` and `net.jsonl` share: the rotated
//!   pair's identity and its export for `--audit-log`.
//! * [`client`]: `ctl.sock` connections.
//! * [`state`]: what the tasks share and the events they report.
//! * [`records`]: `pids.json`, `status.json` and `token` in the VM directory.
//! * [`session`]: the session loop over phase enums (guest, link, client,
//!   mode) and the one teardown.
//! * [`teardown`]: killing and reaping every descendant, removing files.

mod accept;
mod audit;
mod bridge;
mod cgroup;
mod client;
mod config;
mod conntrace;
mod exec;
mod guest;
mod heartbeat;
mod jsonl;
mod log;
mod logkeep;
mod net;
mod publish;
mod ready;
mod reaper;
mod records;
mod session;
mod state;
mod teardown;
mod vmdir;
mod vmm;

use std::process::ExitCode;

use clap::Parser;

use crate::config::Config;
use crate::ready::ReadyFd;
use crate::session::{Session, Stop};
use crate::vmdir::VmDir;

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("cannot become a child subreaper")]
    Subreaper(#[source] nix::Error),
    #[error(transparent)]
    Ready(#[from] ready::ReadyError),
    #[error(transparent)]
    VmDir(#[from] vmdir::VmDirError),
    #[error(transparent)]
    Log(#[from] log::LogError),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Session(#[from] session::SessionError),
}

fn main() -> ExitCode {
    let cfg = match Config::try_parse() {
        Ok(cfg) => cfg,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    if let Err(e) = cfg.net_policy() {
        eprintln!("capsem-process: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = cfg.check_publish() {
        eprintln!("capsem-process: {e}");
        return ExitCode::from(2);
    }
    match run(cfg) {
        Ok(Stop::BootFailed(_)) => ExitCode::from(1),
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = log::chain(&e);
            tracing::error!("{msg}");
            eprintln!("capsem-process: {msg}");
            ExitCode::from(1)
        }
    }
}

fn run(cfg: Config) -> Result<Stop, MainError> {
    // First, so no fd of ours leaks into a child even on an early error.
    let mut ready = match cfg.ready_fd {
        Some(fd) => ReadyFd::adopt(fd)?,
        None => ReadyFd::default(),
    };
    let result = start(cfg, &mut ready);
    if let Err(e) = &result {
        let _ = ready.error(&log::chain(e));
    }
    result
}

fn start(cfg: Config, ready: &mut ReadyFd) -> Result<Stop, MainError> {
    // Every descendant, even a double-forked one, is reparented to us, so
    // teardown can kill and reap it.
    nix::sys::prctl::set_child_subreaper(true).map_err(MainError::Subreaper)?;
    let dir = VmDir::new(&cfg.vm_dir);
    dir.prepare()?;
    log::init(&dir.process_log())?;
    tracing::info!(
        "capsem-process {} starting: vm_id={} vmm={:?} temporary={} dir={}",
        env!("CARGO_PKG_VERSION"),
        cfg.vm_id,
        cfg.vmm,
        cfg.temporary,
        dir.root().display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("capsem-process")
        .enable_all()
        .build()
        .map_err(MainError::Runtime)?;
    let stop = runtime.block_on(async {
        // On a setup error the ready fd stays with the caller, which reports it.
        let session = Session::new(cfg, dir)?;
        session.run(std::mem::take(ready)).await
    })?;
    tracing::info!("exiting: {stop}");
    Ok(stop)
}
