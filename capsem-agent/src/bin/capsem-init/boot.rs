//! The boot sequence: pseudo filesystems, modules, the switch to the real
//! root (when the command line names one), hostname, then the agent.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::wait::WaitStatus;

use crate::cgroups;
use crate::cmdline::{self, CmdlineError};
use crate::console;
use crate::log;
use crate::modules::{self, ModuleError};
use crate::mounts::{self, MountError};
use crate::root::{self, RootDisks, RootError};
use crate::shares::{self, ShareMountError};
use crate::stages::{self, BootStages};
use crate::supervise::{AgentCommand, AgentEnd, SuperviseError, Supervisor};

/// The agent's home and working directory.
const HOME: &str = "/root";
/// PATH for the agent and, through it, the shell.
pub(crate) const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Anything that stops the boot; each cause keeps its module's error.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("mounting filesystems failed")]
    Mount(#[from] MountError),
    #[error("reading the kernel command line failed")]
    Cmdline(#[from] CmdlineError),
    #[error("loading kernel modules failed")]
    Modules(#[from] ModuleError),
    #[error("switching to the root filesystem failed")]
    Root(#[from] RootError),
    #[error("mounting the shares failed")]
    Shares(#[from] ShareMountError),
    #[error("setting the hostname failed")]
    Hostname(#[source] Errno),
    #[error("bringing up the network failed")]
    Net(#[from] crate::netup::NetUpError),
    #[error("supervising the agent failed")]
    Supervise(#[from] SuperviseError),
}

/// Boots the guest and runs the agent until it ends.
pub fn run() -> Result<AgentEnd, BootError> {
    let mut stages = BootStages::default();
    stages.mark("init_start");
    // Blocked before any child exists, so no SIGCHLD is lost.
    let mut sup = Supervisor::new()?;

    mounts::mount_list("", mounts::EARLY)?;
    console::ensure_stdio();
    stages.mark("mounts");
    log!("filesystems mounted");

    let cmd = cmdline::read()?;
    nix::unistd::sethostname(&cmd.hostname).map_err(BootError::Hostname)?;

    // Before the root switch: the lists and modules live in the initramfs.
    let mut loaded = modules::load_list(Path::new(modules::MODULE_LIST))?;
    if !cmd.shares.is_empty() {
        loaded += modules::load_list(Path::new(modules::SHARE_MODULE_LIST))?;
    }
    if cmd.net {
        loaded += modules::load_list(Path::new(modules::NET_MODULE_LIST))?;
    }
    stages.mark("modules");
    log!("{loaded} kernel modules loaded");
    // Nothing loads a module after this, and the initramfs stays in memory
    // for the agent's sake: its module files would hold 5-6 MiB of guest
    // RAM (and so of the host's) for the VM's whole life.
    if let Err(e) = std::fs::remove_dir_all(modules::MODULE_DIR) {
        log!("warning: cannot remove {}: {e}", modules::MODULE_DIR);
    }

    let (switched, image_config) = match &cmd.root {
        Some(serial) => {
            let image_config = root::switch(&RootDisks {
                root: serial,
                disk: cmd.disk.as_deref(),
                shares: &cmd.shares,
            })?;
            stages.mark("root");
            log!("switched to the root filesystem");
            (true, image_config)
        }
        None => {
            mounts::mount_list("", std::slice::from_ref(&mounts::RUN))?;
            shares::mount_in_initramfs(&cmd.shares)?;
            (false, None)
        }
    };
    mounts::mount_late()?;
    if let Err(e) = cgroups::protect_self() {
        log!("warning: {}", chain(&e));
    }
    // Without the tree the agent runs its commands uncontained (said once
    // here); the VM still boots.
    let cgroup = cgroups::setup()
        .map_err(|e| log!("warning: no per-command cgroups: {}", chain(&e)))
        .ok();
    if cmd.net {
        crate::netup::bring_up()?;
        stages.mark("net");
        log!("network up: every connection goes through the host's policy");
    }

    if cmd.token.is_none() {
        log!("no capsem.token on the kernel command line; the host will refuse the hello");
    }
    stages.mark("agent_spawn");
    let mut agent = agent_command(&cmd, &stages, switched);
    if let Some(parent) = cgroup {
        agent.env.push((CGROUP_ENV.to_owned(), parent.to_owned()));
    }
    if let Some(text) = image_config {
        agent.env.push((IMAGE_CONFIG_ENV.to_owned(), text));
    }
    let pid = sup.spawn(&agent)?;
    log!("started {} as pid {pid}", agent.program.display());

    let end = sup.wait_agent(pid, Some(&mut crate::reclaim::IdleReclaim::default()))?;
    match end {
        AgentEnd::Exited(WaitStatus::Exited(_, code)) => log!("agent exited with status {code}"),
        AgentEnd::Exited(WaitStatus::Signaled(_, sig, _)) => log!("agent killed by {sig}"),
        AgentEnd::Exited(other) => log!("agent ended: {other:?}"),
        AgentEnd::Signalled(sig) => log!("received {sig}; stopping"),
    }
    Ok(end)
}

/// Names the agent's parent cgroup (`capsem-agent/src/cgroup/`).
const CGROUP_ENV: &str = "CAPSEM_CGROUP";

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

/// The OCI image's run settings (its config JSON) for the agent.
const IMAGE_CONFIG_ENV: &str = "CAPSEM_IMAGE_CONFIG";

/// The agent's command line and complete environment (nothing is inherited
/// from the kernel's environment for PID 1). After a switch the default
/// agent is the initramfs's, bound into the new root.
fn agent_command(cmd: &cmdline::Cmdline, stages: &BootStages, switched: bool) -> AgentCommand {
    let mut env = vec![
        ("PATH".to_owned(), PATH.to_owned()),
        ("HOME".to_owned(), HOME.to_owned()),
        ("USER".to_owned(), "root".to_owned()),
        ("LOGNAME".to_owned(), "root".to_owned()),
        (stages::ENV.to_owned(), stages.to_env()),
    ];
    if let Some(token) = &cmd.token {
        env.push(("CAPSEM_TOKEN".to_owned(), token.clone()));
    }
    env.push(("CAPSEM_MODE".to_owned(), cmd.mode.clone()));
    if cmd.net {
        env.push(("CAPSEM_NET".to_owned(), "1".to_owned()));
    }
    let default = cmd.agent == Path::new(cmdline::DEFAULT_AGENT);
    let args = if default {
        vec!["--transport".into(), "vsock".into()]
    } else {
        vec![]
    };
    let program = if default && switched {
        PathBuf::from(root::AGENT_IN_ROOT)
    } else {
        cmd.agent.clone()
    };
    AgentCommand {
        program,
        args,
        env,
        cwd: PathBuf::from(HOME),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_gets_token_stages_and_vsock() {
        let cmd = cmdline::parse("capsem.token=tok").unwrap();
        let mut stages = BootStages::default();
        stages.mark("init_start");
        let a = agent_command(&cmd, &stages, false);
        assert_eq!(a.program, PathBuf::from("/usr/bin/capsem-agent"));
        let b = agent_command(&cmd, &stages, true);
        assert_eq!(b.program, PathBuf::from("/run/capsem/capsem-agent"));
        assert_eq!(b.args, a.args);
        assert_eq!(a.args, vec!["--transport", "vsock"]);
        assert_eq!(a.cwd, PathBuf::from("/root"));
        let get = |k: &str| a.env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CAPSEM_TOKEN"), Some("tok"));
        assert_eq!(get("HOME"), Some("/root"));
        assert!(get("CAPSEM_BOOT_STAGES")
            .unwrap()
            .starts_with("init_start="));
    }

    #[test]
    fn persistent_mode_reaches_the_agent() {
        let cmd = cmdline::parse("capsem.token=tok capsem.mode=persistent").unwrap();
        let a = agent_command(&cmd, &BootStages::default(), true);
        let mode = a.env.iter().find(|(k, _)| k == "CAPSEM_MODE");
        assert_eq!(mode.map(|(_, v)| v.as_str()), Some("persistent"));
    }

    #[test]
    fn stand_in_agent_gets_no_arguments() {
        let cmd = cmdline::parse("capsem.agent=/bin/sh").unwrap();
        let a = agent_command(&cmd, &BootStages::default(), true);
        assert!(a.args.is_empty());
        assert!(!a.env.iter().any(|(k, _)| k == "CAPSEM_TOKEN"));
    }
}
