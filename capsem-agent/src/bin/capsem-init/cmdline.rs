//! The `capsem.*` parameters of the kernel command line.
//!
//! | parameter | meaning | default |
//! |---|---|---|
//! | `capsem.token=T` | session token, passed to the agent as `CAPSEM_TOKEN` | none (the agent's hello will be refused) |
//! | `capsem.hostname=H` | guest hostname | `capsem` |
//! | `capsem.agent=PATH` | program to run instead of the agent (debugging) | `/usr/bin/capsem-agent` |
//! | `capsem.root=S` | virtio serial of the read-only root image: mount it under an overlay and switch into it | none (the initramfs stays the root) |
//! | `capsem.disk=S` | virtio serial of the writable disk (ext4) that holds the overlay's upper layer | none (the upper layer is a tmpfs) |
//! | `capsem.net=1` | bring up the redirected network (`netup`) and pass `CAPSEM_NET=1` to the agent | off: no network at all |
//! | `capsem.mode=M` | the agent's mode, passed as `CAPSEM_MODE`: `shell` (one shell, then power off), `persistent` (a fresh shell whenever one exits; only a host `Shutdown` ends the VM), `exec` (one command instead of a shell) | `shell` |

use std::path::PathBuf;

use capsem_proto::guest::MAX_TOKEN_LEN;

/// Where the kernel exposes its command line.
pub const PROC_CMDLINE: &str = "/proc/cmdline";
/// The agent the init runs unless `capsem.agent=` says otherwise.
pub const DEFAULT_AGENT: &str = "/usr/bin/capsem-agent";
/// The hostname unless `capsem.hostname=` says otherwise.
pub const DEFAULT_HOSTNAME: &str = "capsem";
/// The values `capsem.mode=` accepts, as the agent's `CAPSEM_MODE` does.
pub const MODES: [&str; 3] = ["shell", "persistent", "exec"];
/// Longest virtio-blk serial (`VIRTIO_BLK_ID_BYTES`).
const MAX_SERIAL: usize = 20;
/// Longest hostname Linux accepts (`HOST_NAME_MAX`).
const MAX_HOSTNAME: usize = 64;

/// Errors reading or validating the command line.
#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("cannot read {PROC_CMDLINE}")]
    Read(#[source] std::io::Error),
    #[error("capsem.token of {len} bytes is over the limit of {MAX_TOKEN_LEN}")]
    TokenTooLong { len: usize },
    #[error("capsem.token holds characters other than printable ASCII")]
    TokenInvalid,
    #[error("capsem.hostname {0:?} is not a valid hostname")]
    HostnameInvalid(String),
    #[error("capsem.agent {0:?} is not an absolute path")]
    AgentNotAbsolute(String),
    #[error("{param} {value:?} is not a disk serial (1 to 20 of [A-Za-z0-9_-])")]
    SerialInvalid { param: &'static str, value: String },
    #[error("capsem.mode {0:?} is not shell, persistent or exec")]
    ModeInvalid(String),
}

/// What the init takes from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    pub token: Option<String>,
    pub hostname: String,
    pub agent: PathBuf,
    /// One of [`MODES`].
    pub mode: String,
    /// Serial of the root image disk.
    pub root: Option<String>,
    /// Serial of the writable disk.
    pub disk: Option<String>,
    /// `capsem.net=1`.
    pub net: bool,
}

/// Reads and parses [`PROC_CMDLINE`] (procfs must be mounted).
pub fn read() -> Result<Cmdline, CmdlineError> {
    let text = std::fs::read_to_string(PROC_CMDLINE).map_err(CmdlineError::Read)?;
    parse(&text)
}

/// Parses a command line; the last occurrence of a parameter wins, as for
/// the kernel's own parameters.
pub fn parse(text: &str) -> Result<Cmdline, CmdlineError> {
    let mut out = Cmdline {
        token: None,
        hostname: DEFAULT_HOSTNAME.to_owned(),
        agent: PathBuf::from(DEFAULT_AGENT),
        mode: "shell".to_owned(),
        root: None,
        disk: None,
        net: false,
    };
    for word in text.split_ascii_whitespace() {
        if let Some(token) = word.strip_prefix("capsem.token=") {
            if token.len() > MAX_TOKEN_LEN {
                return Err(CmdlineError::TokenTooLong { len: token.len() });
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(CmdlineError::TokenInvalid);
            }
            out.token = Some(token.to_owned());
        } else if let Some(name) = word.strip_prefix("capsem.hostname=") {
            if !valid_hostname(name) {
                return Err(CmdlineError::HostnameInvalid(name.to_owned()));
            }
            out.hostname = name.to_owned();
        } else if let Some(agent) = word.strip_prefix("capsem.agent=") {
            if !agent.starts_with('/') {
                return Err(CmdlineError::AgentNotAbsolute(agent.to_owned()));
            }
            out.agent = PathBuf::from(agent);
        } else if let Some(serial) = word.strip_prefix("capsem.root=") {
            out.root = Some(serial_param("capsem.root", serial)?);
        } else if let Some(serial) = word.strip_prefix("capsem.disk=") {
            out.disk = Some(serial_param("capsem.disk", serial)?);
        } else if let Some(net) = word.strip_prefix("capsem.net=") {
            out.net = net == "1";
        } else if let Some(mode) = word.strip_prefix("capsem.mode=") {
            if !MODES.contains(&mode) {
                return Err(CmdlineError::ModeInvalid(mode.chars().take(32).collect()));
            }
            out.mode = mode.to_owned();
        }
    }
    Ok(out)
}

fn serial_param(param: &'static str, value: &str) -> Result<String, CmdlineError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_SERIAL
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(value.to_owned())
    } else {
        Err(CmdlineError::SerialInvalid {
            param,
            value: value.chars().take(32).collect(),
        })
    }
}

/// RFC 1123 labels separated by dots, at most [`MAX_HOSTNAME`] bytes.
fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_HOSTNAME
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_is_shell_persistent_or_exec() {
        assert_eq!(parse("").unwrap().mode, "shell");
        assert_eq!(parse("capsem.mode=shell").unwrap().mode, "shell");
        assert_eq!(parse("capsem.mode=exec").unwrap().mode, "exec");
        assert_eq!(
            parse("console=ttyS0 capsem.mode=persistent quiet")
                .unwrap()
                .mode,
            "persistent"
        );
        assert_eq!(
            parse("capsem.mode=exec capsem.mode=persistent")
                .unwrap()
                .mode,
            "persistent"
        );
        for bad in ["x", "Persistent", "persist", ""] {
            assert!(
                matches!(
                    parse(&format!("capsem.mode={bad}")),
                    Err(CmdlineError::ModeInvalid(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn root_and_disk_serials() {
        let c = parse("capsem.root=capsem-root capsem.disk=capsem-disk").unwrap();
        assert_eq!(c.root.as_deref(), Some("capsem-root"));
        assert_eq!(c.disk.as_deref(), Some("capsem-disk"));
        let c = parse("").unwrap();
        assert_eq!((c.root, c.disk), (None, None));
        for bad in ["", "a/b", "x".repeat(21).as_str()] {
            assert!(matches!(
                parse(&format!("capsem.root={bad}")),
                Err(CmdlineError::SerialInvalid {
                    param: "capsem.root",
                    ..
                })
            ));
            assert!(matches!(
                parse(&format!("capsem.disk={bad}")),
                Err(CmdlineError::SerialInvalid {
                    param: "capsem.disk",
                    ..
                })
            ));
        }
    }

    #[test]
    fn defaults() {
        let c = parse("console=ttyS0 quiet\n").unwrap();
        assert_eq!(c.token, None);
        assert_eq!(c.hostname, "capsem");
        assert_eq!(c.agent, PathBuf::from(DEFAULT_AGENT));
    }

    #[test]
    fn reads_capsem_parameters() {
        let c = parse(
            "console=ttyS0 capsem.token=ab12 capsem.hostname=honest-tiger capsem.agent=/bin/sh\n",
        )
        .unwrap();
        assert_eq!(c.token.as_deref(), Some("ab12"));
        assert_eq!(c.hostname, "honest-tiger");
        assert_eq!(c.agent, PathBuf::from("/bin/sh"));
    }

    #[test]
    fn last_occurrence_wins() {
        let c = parse("capsem.token=a capsem.token=b").unwrap();
        assert_eq!(c.token.as_deref(), Some("b"));
    }

    #[test]
    fn rejects_bad_values() {
        let long = format!("capsem.token={}", "x".repeat(MAX_TOKEN_LEN + 1));
        assert!(matches!(
            parse(&long),
            Err(CmdlineError::TokenTooLong { .. })
        ));
        assert!(matches!(
            parse("capsem.token=\u{e9}"),
            Err(CmdlineError::TokenInvalid)
        ));
        for bad in ["-a", "a..b", "a_b", ""] {
            assert!(
                matches!(
                    parse(&format!("capsem.hostname={bad}")),
                    Err(CmdlineError::HostnameInvalid(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            parse("capsem.agent=sh"),
            Err(CmdlineError::AgentNotAbsolute(_))
        ));
    }

    #[test]
    fn ignores_similar_names() {
        let c = parse("xcapsem.token=a capsem.tokens=b").unwrap();
        assert_eq!(c.token, None);
    }
}
