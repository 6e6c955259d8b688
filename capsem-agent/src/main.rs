//! `capsem-agent`: the guest agent. It starts the interactive shell on a PTY
//! and bridges it to the host (capsem-process) over vsock, or over the Unix
//! sockets vhost-device-vsock delivers, one connection generation at a time.
//!
//! ```text
//! capsem-agent [--transport vsock|unix:PATH] [--host-timeout-ms N] [--vm-id ID]
//! ```
//!
//! * `--transport` (default `vsock`): `vsock` connects to CID 2, ports 5000
//!   (control) and 5001 (terminal); `unix:PATH` connects to `PATH_5000` and
//!   `PATH_5001`.
//! * `--host-timeout-ms` (default 15000): the transport counts as lost when
//!   no control message arrived for this long.
//! * `--vm-id` (optional, 1 to 64 characters of `[A-Za-z0-9._-]`): logged at
//!   start and otherwise unused; the host passes it so that an exact argv
//!   element identifies the agent's pid later.
//! * `$CAPSEM_TOKEN` (required, at most 128 bytes): the session token sent in
//!   every hello.
//! * `$CAPSEM_BOOT_STAGES` (optional, `name=micros,...`): reported once as
//!   `BootTimings` after the first HelloAck; an invalid list is logged and
//!   not sent.
//! * `$CAPSEM_MODE` (optional): `shell` (the default, also when empty): one
//!   shell; the agent exits once its status is delivered. `persistent` (for
//!   VMs that outlive any one shell): when a shell exits and its status is
//!   delivered, the agent starts a fresh shell and connects again at once;
//!   only a shutdown ends it. `exec` starts no shell; the agent runs one
//!   command that the host sends on the exec port (see [`exec`]). Anything
//!   else is a configuration error.
//! * `$CAPSEM_AUDIT` (optional, shell and persistent modes): the execve
//!   audit stream's source (see [`audit`]). Unset or empty: the kernel audit
//!   subsystem with the vsock transport (inside a VM), none with a Unix
//!   transport (the host's audit configuration is never touched); `1`: the
//!   kernel; `0`: none; `file:PATH`: auditd log lines from a file or FIFO
//!   (tests). When audit is unavailable the agent logs one line and runs
//!   without it; anything else is a configuration error.
//! * `$CAPSEM_NET` (optional): `1` (capsem-init sets it for `capsem.net=1`)
//!   starts the resolver on 127.0.0.1:53 and the TCP side on 127.0.0.1:849
//!   (see [`net`]); a failure to start is logged and leaves no network.
//! * With the vsock transport (inside a VM) the agent also brings `lo` up
//!   and listens on vsock port 5008 for published ports (see [`publish`]);
//!   a failure to start is logged and leaves the VM without them.
//! * `$RUST_LOG` (optional, default `info`): log filter. Logs go to stderr
//!   with RFC 3339 UTC timestamps.
//!
//! The shell is `/bin/bash -i` (else `/bin/sh -i`) in the agent's working
//! directory with `TERM=xterm-256color`, `PATH`, `SHELL`, `LANG=C.UTF-8`
//! and `HOME`: `/root` with the vsock transport (inside a VM), the agent's
//! working directory with a Unix transport (`--vmm none`).
//!
//! Exit codes:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | the shell exited and its status was delivered (shell mode), or a shutdown (host `Shutdown`, SIGTERM, SIGINT, SIGHUP) stopped the shell |
//! | 1 | runtime failure (cannot start the shell, signal setup, a bridge thread panicked) |
//! | 2 | usage or configuration error (bad flag or `--vm-id`, missing or over-long `$CAPSEM_TOKEN`, unknown `$CAPSEM_MODE` or `$CAPSEM_AUDIT`) |
//!
//! Modules:
//!
//! * [`session`]: shell and persistent modes' main loop (connect, hello,
//!   bridge, act on the end).
//! * [`execpool`]: a persistent VM's concurrent `capsem exec` commands.
//! * [`exec`]: exec mode: one command, its streams on the exec port, one
//!   poll loop (`exec/serve.rs`, also the exec pool's workers').
//! * [`command`]: the exec-mode command: pipes, pidfd, process group.
//! * [`bridge`]: one generation's six threads (terminal frames out and in,
//!   control) and its typed [`bridge::BridgeEnd`].
//! * [`audit`]: the execve audit stream: the agent-lifetime netlink source
//!   and reader thread (socket and wire format), the record parser and
//!   event assembler, the unacknowledged-record buffer,
//!   and the per-generation audit connection.
//! * [`control`]: the hello handshake and the boot stage parser.
//! * [`pty`]: the shell on a PTY: spawn, resize, terminate, reap.
//! * [`cgroup`]: inside a VM, each shell's and command's own limited cgroup
//!   and the watcher thread that kills one at its limit.
//! * [`transport`]: vsock or Unix connections, cancellable.
//! * [`reconnect`]: capped, jittered exponential backoff.
//! * [`signals`]: SIGTERM/SIGINT/SIGHUP as a signalfd.
//! * [`farewell`]: the last generation's control connection, closed as the
//!   agent's last act (a temporary VM's host kills the VM at that close).
//! * [`stop`]: the per-generation stop signal (eventfd + channel).
//! * [`net`]: the guest's network (`$CAPSEM_NET=1`): the DNS stub and the
//!   redirected TCP connections, decided by the host on the network port.
//! * [`publish`]: inside a VM, the listener on vsock port 5008 for the
//!   host's connections to published ports (`capsem -p`), each dialled to
//!   127.0.0.1:PORT in the guest and relayed.
//! * [`relay`]: the byte relay both of those use (first side done, or each
//!   direction on its own with half-close and an idle bound).
//! * [`fdio`]: poll, nonblocking reads and writes, cancellable writes, and
//!   `Blocking`, a cancellable `Read + Write` for the framed adapters.

mod audit;
mod bridge;
mod cgroup;
mod command;
mod control;
mod exec;
mod execpool;
mod farewell;
mod fdio;
mod imageconfig;
mod net;
mod pty;
mod publish;
mod reconnect;
mod relay;
mod session;
mod signals;
mod stop;
mod transport;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tracing::{error, info};

use crate::farewell::Farewell;
use crate::session::{chain, Config, Outcome, SessionError};
use crate::signals::{Signals, SignalsError};
use crate::transport::Transport;

/// Command line.
#[derive(Debug, Parser)]
#[command(name = "capsem-agent", about = "capsem guest agent")]
struct Cli {
    /// `vsock` or `unix:PATH` (connects to PATH_5000 and PATH_5001).
    #[arg(long, default_value = "vsock")]
    transport: Transport,
    /// Declare the transport lost after this many ms without a host message
    /// (1 to 86400000).
    #[arg(long, default_value_t = 15000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    host_timeout_ms: u64,
    /// The VM's id, logged; the host finds the agent's pid by this exact
    /// argument (1 to 64 characters of A-Z a-z 0-9 . _ -).
    #[arg(long, value_parser = parse_vm_id)]
    vm_id: Option<String>,
}

/// Longest `--vm-id`.
const MAX_VM_ID: usize = 64;

/// `--vm-id`: 1 to [`MAX_VM_ID`] characters of `[A-Za-z0-9._-]`.
fn parse_vm_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= MAX_VM_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "must be 1 to {MAX_VM_ID} characters of A-Z a-z 0-9 . _ -"
        ))
    }
}

/// Why the agent failed; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
enum AgentError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot set up signal handling")]
    Signals(#[source] SignalsError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("exec mode failed")]
    Exec(#[from] exec::ExecError),
    #[error("cannot start the exec pool")]
    ExecPool(#[from] execpool::ExecPoolError),
}

impl AgentError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => 2,
            Self::Signals(_) | Self::Session(_) | Self::Exec(_) | Self::ExecPool(_) => 1,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging();
    match run(cli) {
        Ok((outcome, farewell)) => {
            info!(outcome = %outcome, "agent exiting");
            farewell.close();
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("agent failed: {}", chain(&e));
            ExitCode::from(e.exit_code())
        }
    }
}

/// How the agent ended, for its last log line.
#[derive(Debug)]
enum Ended {
    Shell(Outcome),
    Exec(exec::ExecOutcome),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shell(o) => write!(f, "{o:?}"),
            Self::Exec(o) => write!(f, "{o:?}"),
        }
    }
}

/// What `$CAPSEM_MODE` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One shell; the agent exits once its status is delivered.
    Shell,
    /// A fresh shell whenever one exits; only a shutdown ends the agent.
    Persistent,
    /// One command from the exec port, no shell.
    Exec,
}

impl Mode {
    /// Parses `$CAPSEM_MODE`'s value; unset and empty mean `shell`.
    fn parse(value: Option<&str>) -> Result<Self, AgentError> {
        match value {
            None | Some("") | Some("shell") => Ok(Self::Shell),
            Some("persistent") => Ok(Self::Persistent),
            Some("exec") => Ok(Self::Exec),
            Some(other) => Err(AgentError::Config(format!(
                "CAPSEM_MODE must be shell, persistent or exec, got {:?}",
                other.chars().take(32).collect::<String>()
            ))),
        }
    }

    fn from_env() -> Result<Self, AgentError> {
        match std::env::var("CAPSEM_MODE") {
            Ok(v) => Self::parse(Some(&v)),
            Err(std::env::VarError::NotPresent) => Self::parse(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(AgentError::Config("CAPSEM_MODE is not UTF-8".into()))
            }
        }
    }
}

/// Runs the agent; the farewell ([`farewell`]) is closed by `main` after
/// the last log line.
fn run(cli: Cli) -> Result<(Ended, Farewell), AgentError> {
    let token = std::env::var("CAPSEM_TOKEN")
        .map_err(|_| AgentError::Config("CAPSEM_TOKEN is not set (or not UTF-8)".into()))?;
    if token.is_empty() || token.len() > capsem_proto::guest::MAX_TOKEN_LEN {
        return Err(AgentError::Config(format!(
            "CAPSEM_TOKEN must be 1 to {} bytes",
            capsem_proto::guest::MAX_TOKEN_LEN
        )));
    }
    let boot_stages = match std::env::var("CAPSEM_BOOT_STAGES") {
        Ok(s) => control::parse_boot_stages(&s).unwrap_or_else(|e| {
            tracing::warn!("CAPSEM_BOOT_STAGES ignored: {}", chain(&e));
            Vec::new()
        }),
        Err(_) => Vec::new(),
    };
    let image = imageconfig::from_env().map_err(|e| AgentError::Config(chain(&e)))?;
    // After the root switch: the image's own passwd and group decide.
    let user = image
        .user
        .as_deref()
        .map(imageconfig::resolve_here)
        .transpose()
        .map_err(AgentError::Config)?;
    let creds = user.as_ref().map(|u| u.creds);
    let cwd = match &image.working_dir {
        // Like `docker run`, a WorkingDir the image lacks is made.
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| {
                AgentError::Config(format!("cannot create WorkingDir {}: {e}", dir.display()))
            })?;
            dir.clone()
        }
        None => std::env::current_dir()
            .map_err(|e| AgentError::Config(format!("no working directory: {e}")))?,
    };
    let home = match (&cli.transport, user.and_then(|u| u.home)) {
        (Transport::Vsock, Some(user_home)) => user_home,
        (Transport::Vsock, None) => PathBuf::from("/root"),
        (Transport::Unix(_), _) => cwd.clone(),
    };
    let mode = Mode::from_env()?;
    // Before any thread or child: the watcher is one more agent-lifetime
    // thread, stopped and joined when the last holder drops it.
    let cgroups = cgroup::Cgroups::from_env().map_err(|e| AgentError::Config(chain(&e)))?;
    let vm_id = cli.vm_id.as_deref().unwrap_or("-");
    if mode == Mode::Exec {
        let cfg = exec::ExecConfig {
            transport: cli.transport,
            token,
            home,
            cwd,
            image_env: image.env.clone(),
            creds,
            cgroups,
        };
        let audit_mode = audit::AuditMode::from_env(&cfg.transport)
            .map_err(|e| AgentError::Config(chain(&e)))?;
        let signals = Signals::block().map_err(AgentError::Signals)?;
        info!(transport = %cfg.transport, vm_id = %vm_id, "agent starting in exec mode");
        // Before the command, so its execs are audited (`capsem run
        // --audit-log`); dropped after it.
        let auditor = audit::Auditor::start(&audit_mode);
        let network = net::NetService::from_env(&cfg.transport, &cfg.token);
        let published = publish::PublishService::in_vm(&cfg.transport, &cfg.token);
        let mut farewell = Farewell::default();
        let ended = exec::run(&cfg, &signals, auditor.as_ref(), &mut farewell);
        drop(published);
        drop(network);
        drop(auditor);
        return Ok((Ended::Exec(ended?), farewell));
    }
    let exec_cfg = exec::ExecConfig {
        transport: cli.transport.clone(),
        token: token.clone(),
        home: home.clone(),
        cwd: cwd.clone(),
        image_env: image.env.clone(),
        creds,
        cgroups: cgroups.clone(),
    };
    let audit_mode =
        audit::AuditMode::from_env(&cli.transport).map_err(|e| AgentError::Config(chain(&e)))?;
    let cfg = Config {
        transport: cli.transport,
        token,
        host_timeout: Duration::from_millis(cli.host_timeout_ms),
        boot_stages,
        shell: pty::ShellConfig::interactive(&home, cwd)
            .with_image_env(&image.env)
            .with_creds(creds),
        persistent: mode == Mode::Persistent,
        cgroups,
    };
    // Before the shell and before any thread, so every thread inherits the
    // mask and the signals only arrive through the signalfd.
    let signals = Signals::block().map_err(AgentError::Signals)?;
    info!(
        transport = %cfg.transport,
        host_timeout_ms = cli.host_timeout_ms,
        ?mode,
        vm_id = %vm_id,
        "agent starting"
    );
    // A persistent VM also runs `capsem exec` commands, beside its shell;
    // the pool is stopped and joined (its commands' groups terminated) when
    // the session ends.
    let pool = if mode == Mode::Persistent {
        Some(execpool::ExecPool::start(exec_cfg)?)
    } else {
        None
    };
    // Before the first shell, so that its exec is audited too; dropped after
    // the session, which stops the reader and (outside a VM) restores the kernel's audit
    // configuration.
    let auditor = audit::Auditor::start(&audit_mode);
    let network = net::NetService::from_env(&cfg.transport, &cfg.token);
    let published = publish::PublishService::in_vm(&cfg.transport, &cfg.token);
    let mut farewell = Farewell::default();
    let ended = session::run(&cfg, &signals, auditor.as_ref(), &mut farewell);
    drop(published);
    drop(network);
    drop(pool);
    drop(auditor);
    Ok((Ended::Shell(ended?), farewell))
}

fn init_logging() {
    use tracing_subscriber::fmt::time::UtcTime;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_timer(UtcTime::rfc_3339())
        .with_env_filter(filter)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_values() {
        assert_eq!(Mode::parse(None).unwrap(), Mode::Shell);
        assert_eq!(Mode::parse(Some("")).unwrap(), Mode::Shell);
        assert_eq!(Mode::parse(Some("shell")).unwrap(), Mode::Shell);
        assert_eq!(Mode::parse(Some("persistent")).unwrap(), Mode::Persistent);
        assert_eq!(Mode::parse(Some("exec")).unwrap(), Mode::Exec);
        for bad in ["Persistent", "persist", "shell ", "x"] {
            let err = Mode::parse(Some(bad)).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn vm_id_values() {
        for good in ["a", "vm-1", "my_vm.2", &"x".repeat(MAX_VM_ID)] {
            assert_eq!(parse_vm_id(good).as_deref(), Ok(good), "{good}");
        }
        for bad in ["", "a b", "a/b", "é", "a\0b", &"x".repeat(MAX_VM_ID + 1)] {
            assert!(parse_vm_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cli_takes_an_optional_vm_id() {
        let cli = Cli::try_parse_from(["capsem-agent"]).unwrap();
        assert_eq!(cli.vm_id, None);
        let cli = Cli::try_parse_from(["capsem-agent", "--vm-id", "v-1"]).unwrap();
        assert_eq!(cli.vm_id.as_deref(), Some("v-1"));
        let err = Cli::try_parse_from(["capsem-agent", "--vm-id", "v 1"]).unwrap_err();
        assert!(err.use_stderr());
    }
}
