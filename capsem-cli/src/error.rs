//! The CLI's one error type, [`CliError`]: what every command can fail
//! with, each cause kept as a `#[source]`, and the [`Exit`] it maps to.
//! `main` prints it as one line, [`one_line_chain`], after `capsem: `.

use std::io;
use std::path::PathBuf;

use capsem_host::lock::LockError;
use capsem_host::vmstate::{NameError, VmStateError};
use capsem_proto::exec::ExecError;

use crate::attach::AttachError;
use crate::auditfmt::AuditError;
use crate::exit::Exit;
use crate::follow::FollowError;
use crate::home::HomeError;
use crate::lost::Lost;
use crate::signals::SignalsError;
use crate::spawn::SpawnError;
use crate::tempvm::TempVmError;
use crate::terminal::TerminalError;
use crate::vms::VmState;

/// Why a command failed. [`CliError::exit`] says how capsem exits.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error("invalid VM name {name:?}: {source}")]
    Name {
        name: String,
        #[source]
        source: NameError,
    },
    #[error("no VM named {0:?} (see capsem list)")]
    NoSuchVm(String),
    #[error("a VM named {0:?} already exists")]
    Exists(String),
    #[error("VM {name:?} is {state}{hint}")]
    WrongState {
        name: String,
        state: VmState,
        hint: &'static str,
    },
    #[error("a command is required: put it after `--` (see capsem help)")]
    NoCommand,
    #[error("image {0} has no Entrypoint or Cmd: give the command after `--`")]
    NoDefaultCommand(String),
    #[error("--disk-size, --image, --net, --net-policy, -v and -p are for a new VM; VM {0:?} keeps what capsem create gave it")]
    NewVmFlag(String),
    #[error("{0:?} is a temporary VM; only persistent VMs (capsem create) take this command")]
    Temporary(String),
    #[error(transparent)]
    State(#[from] VmStateError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// `run`/`exec`: a refused request (a denied variable, an oversized
    /// command).
    #[error(transparent)]
    Request(#[from] ExecError),
    #[error("environment variable {0} is not set here (from -e {0})")]
    EnvUnset(String),
    #[error("the value of environment variable {0} is not UTF-8")]
    EnvNotUtf8(String),
    #[error("cannot write the audit log {path}")]
    AuditLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    TempVm(#[from] TempVmError),
    #[error(transparent)]
    VmImage(#[from] crate::vmimage::VmImageError),
    #[error(transparent)]
    Net(#[from] crate::netflags::NetFlagError),
    #[error(transparent)]
    Share(#[from] crate::share::ShareArgError),
    #[error(transparent)]
    Publish(#[from] crate::publish::PublishArgError),
    #[error(transparent)]
    Diff(#[from] crate::overlaydiff::DiffError),
    /// capsem-process's own words for why the VM did not start.
    #[error("{0}")]
    Boot(String),
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
    #[error(
        "VM {name:?} was created but did not boot: {reason} (capsem logs {name}; capsem rm {name})"
    )]
    NotBooted { name: String, reason: String },
    #[error("{role} (pid {pid}) survived SIGKILL")]
    Survived { role: String, pid: u32 },
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Terminal(#[from] TerminalError),
    #[error(transparent)]
    Signals(#[from] SignalsError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error("VM {name:?} has no {file} (yet): {path} does not exist")]
    LogMissing {
        name: String,
        file: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Follow(#[from] FollowError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("session lost")]
    SessionLost(#[source] Lost),
    /// `capsem image ...`: a missing image, a digest mismatch, an
    /// unsupported media type, an unreachable registry...
    #[error(transparent)]
    Image(#[from] capsem_image::ImageError),
    /// `capsem cp`: a usage error (125) or a failed copy (1).
    #[error(transparent)]
    Cp(#[from] crate::cpplan::CpError),
}

impl CliError {
    /// 255 for a lost session, `cp`'s own codes, 125 for everything else.
    pub fn exit(&self) -> Exit {
        match self {
            CliError::SessionLost(_) => Exit::Lost,
            CliError::Cp(e) => e.exit(),
            _ => Exit::Failed,
        }
    }
}

/// `error: cause: cause`, on one line (a cause whose text the message
/// already ends with is not repeated).
pub fn one_line_chain(err: &dyn std::error::Error) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_is_one_line() {
        let e = HomeError::Create {
            path: "/x".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        let line = one_line_chain(&e);
        assert!(line.starts_with("cannot create /x: "), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn causes_stay_sources_through_the_cli_error() {
        let e = CliError::from(HomeError::Create {
            path: "/x".into(),
            source: io::Error::from_raw_os_error(libc::EACCES),
        });
        assert!(
            std::error::Error::source(&e).is_some(),
            "transparent keeps the io::Error as the source"
        );
        assert_eq!(e.exit(), Exit::Failed);
        assert_eq!(CliError::SessionLost(Lost::Closed).exit(), Exit::Lost);
    }
}
