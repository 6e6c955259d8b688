//! The VM's state files this process writes (see
//! [`capsem_host::vmstate`]): `token` (so a later capsem-process can adopt
//! the guest), `pids.json` (who runs the VM, by identity) and `status.json`
//! (what the CLI's `inspect` shows). Write failures are logged, never fatal:
//! the VM works without them, only `inspect` and adoption know less.

use capsem_host::identity::ProcRecord;
use capsem_host::vmstate::{
    self, Pids, ShellExit, VmStatusFile, PIDS_FILE, STATUS_FILE, TOKEN_FILE,
};
use tracing::warn;

use crate::log::chain;
use crate::vmdir::VmDir;

#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error("cannot read the session token of the VM to adopt")]
    Token(#[source] std::io::Error),
    #[error("the VM to adopt has an invalid token file")]
    TokenInvalid,
    #[error("cannot read the VM's pids.json")]
    Pids(#[source] vmstate::VmStateError),
    #[error("the VM to adopt has no pids.json: nothing is running")]
    NoPids,
}

/// `status.json`, kept in memory and written on each change.
#[derive(Debug)]
pub struct Records {
    dir: VmDir,
    status: VmStatusFile,
}

impl Records {
    /// Loads the previous `status.json`, if any, so counts and the last
    /// shell exit survive restarts.
    pub fn load(dir: &VmDir) -> Self {
        let status = match vmstate::read_json(&dir.file(STATUS_FILE)) {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                warn!("starting a new status.json: {}", chain(&e));
                VmStatusFile::default()
            }
        };
        Self {
            dir: VmDir::new(dir.root()),
            status,
        }
    }

    fn write_status(&self) {
        if let Err(e) = vmstate::write_json(&self.dir.file(STATUS_FILE), &self.status) {
            warn!("{}", chain(&e));
        }
    }

    /// A guest was started (`adopted`: taken over) by this process.
    pub fn started(&mut self, adopted: bool, accel: Option<&str>, image: Option<String>) {
        if adopted {
            self.status.adoptions += 1;
        } else {
            self.status.boots += 1;
            self.status.stop_reason = None;
            self.status.accel = Some(accel.unwrap_or("none").to_owned());
            self.status.image = image;
        }
        self.status.generation = 0;
        self.write_status();
    }

    pub fn hello(&mut self, generation: u64, agent_connects: u64, shell_pid: u32) {
        self.status.generation = generation;
        self.status.agent_connects = agent_connects;
        self.status.shell_pid = Some(shell_pid);
        self.write_status();
    }

    pub fn shell_exited(&mut self, exit_code: Option<i32>, signal: Option<i32>) {
        self.status.last_shell_exit = Some(ShellExit {
            exit_code,
            signal,
            at: vmstate::now_rfc3339(),
        });
        self.status.shell_pid = None;
        self.write_status();
    }

    /// Writes `pids.json`: this process and the guest's host processes.
    pub fn write_pids(&self, vm_id: &str, guest: Vec<ProcRecord>, cid: Option<u32>) {
        let me = match capsem_host::identity::record("capsem-process", std::process::id(), vm_id) {
            Ok(r) => r,
            Err(e) => {
                warn!("cannot record our own identity: {e}");
                return;
            }
        };
        let pids = Pids {
            process: me,
            guest,
            cid,
        };
        if let Err(e) = vmstate::write_json(&self.dir.file(PIDS_FILE), &pids) {
            warn!("{}", chain(&e));
        }
    }

    /// Writes the session token (0600), for a later adoption.
    pub fn write_token(&self, token: &str) {
        if let Err(e) = vmstate::write_atomic(&self.dir.file(TOKEN_FILE), token.as_bytes()) {
            warn!("{}", chain(&e));
        }
    }

    /// Nothing runs any more: `pids.json` and `token` go; `reason`, when
    /// the VM stopped itself (a lifetime limit), is recorded.
    pub fn stopped(&mut self, reason: Option<String>) {
        if reason.is_some() {
            self.status.stop_reason = reason;
            self.write_status();
        }
        for name in [PIDS_FILE, TOKEN_FILE] {
            if let Err(e) = crate::teardown::remove_file(&self.dir.file(name)) {
                warn!("{}", chain(&e));
            }
        }
    }
}

/// The token and recorded processes of a VM to adopt.
pub fn read_adoption(dir: &VmDir) -> Result<(String, Pids), RecordsError> {
    let token = std::fs::read_to_string(dir.file(TOKEN_FILE)).map_err(RecordsError::Token)?;
    let token = token.trim().to_owned();
    if token.is_empty()
        || token.len() > capsem_proto::guest::MAX_TOKEN_LEN
        || !token.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(RecordsError::TokenInvalid);
    }
    let pids = vmstate::read_json(&dir.file(PIDS_FILE))
        .map_err(RecordsError::Pids)?
        .ok_or(RecordsError::NoPids)?;
    Ok((token, pids))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_survives_a_restart_and_stop_removes_pids() {
        let d = tempfile::tempdir().unwrap();
        let dir = VmDir::new(d.path());
        let mut r = Records::load(&dir);
        r.started(false, Some("tcg"), Some("/img".into()));
        r.hello(1, 1, 42);
        r.shell_exited(Some(3), None);
        r.write_token("00ff");
        r.write_pids("vm", Vec::new(), Some(3));
        let (token, pids) = read_adoption(&dir).unwrap();
        assert_eq!(token, "00ff");
        assert_eq!(pids.cid, Some(3));
        assert_eq!(pids.process.marker, "vm");

        let mut r = Records::load(&dir);
        r.started(true, None, None);
        let s: VmStatusFile = vmstate::read_json(&dir.file(STATUS_FILE)).unwrap().unwrap();
        assert_eq!((s.boots, s.adoptions, s.agent_connects), (1, 1, 1));
        assert_eq!(s.accel.as_deref(), Some("tcg"));
        assert_eq!(s.last_shell_exit.unwrap().exit_code, Some(3));
        r.stopped(None);
        assert!(matches!(read_adoption(&dir), Err(RecordsError::Token(_))));
        assert!(!dir.file(PIDS_FILE).exists());
    }
}
