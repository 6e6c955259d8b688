//! `--vmm none`: the agent runs as our child, in its own process group, with
//! `--transport unix:<vm-dir>/vsock.sock`, its cwd in `<vm-dir>/scratch`,
//! stdin null and stdout/stderr appended to `<vm-dir>/agent.log`.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{GuestBackend, Launch, VmmError};
use crate::reaper::Child;

/// Environment variable naming the agent binary.
pub const AGENT_BIN_ENV: &str = "CAPSEM_AGENT_BIN";
/// Environment variable carrying the session token to the agent.
pub const TOKEN_ENV: &str = "CAPSEM_TOKEN";
/// Environment variable selecting the agent's mode (`shell` or `exec`).
pub const MODE_ENV: &str = "CAPSEM_MODE";

#[derive(Debug)]
pub struct NoVm {
    children: Vec<Child>,
    records: Vec<capsem_host::identity::ProcRecord>,
}

/// `$CAPSEM_AGENT_BIN`, else `capsem-agent` beside our own executable.
fn agent_binary() -> Result<PathBuf, VmmError> {
    if let Some(bin) = std::env::var_os(AGENT_BIN_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().map_err(VmmError::AgentBinary)?;
    Ok(exe.with_file_name("capsem-agent"))
}

impl NoVm {
    pub fn start(launch: &Launch<'_>) -> Result<Self, VmmError> {
        let scratch = launch.dir.scratch();
        crate::vmdir::private_dir(&scratch).map_err(VmmError::Scratch)?;
        let log_path = launch.dir.agent_log();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|source| VmmError::Prepare {
                path: log_path.clone(),
                source,
            })?;
        let log2 = log.try_clone().map_err(|source| VmmError::Prepare {
            path: log_path,
            source,
        })?;
        let mut transport = OsString::from("unix:");
        transport.push(launch.dir.vsock_base());

        let bin = agent_binary()?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--transport")
            .arg(transport)
            // An exact argv element that identifies the agent as this VM's.
            .arg("--vm-id")
            .arg(launch.vm_id)
            .env(super::none::TOKEN_ENV, launch.token)
            .env(MODE_ENV, launch.cfg.agent_mode())
            .env("HOME", &scratch)
            .current_dir(&scratch)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            // Its own group, so teardown kills it and whatever it left in it.
            .process_group(0);
        let child = launch.reaper.spawn("capsem-agent", &mut cmd)?;
        tracing::info!(
            "vm {}: started {} (pid {}) with --transport unix:{}",
            launch.vm_id,
            bin.display(),
            child.pid,
            launch.dir.vsock_base().display()
        );
        let record = capsem_host::identity::record("capsem-agent", child.pid, launch.vm_id)
            .map_err(|e| VmmError::Backend(format!("cannot record the agent's identity: {e}")))?;
        Ok(Self {
            children: vec![child],
            records: vec![record],
        })
    }
}

impl GuestBackend for NoVm {
    fn name(&self) -> &'static str {
        "none"
    }
    fn children(&self) -> &[Child] {
        &self.children
    }
    fn records(&self) -> Vec<capsem_host::identity::ProcRecord> {
        self.records.clone()
    }
}
