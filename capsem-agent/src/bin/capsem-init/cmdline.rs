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
//! | `capsem.share=TAG,MODE,HEX` | a host directory to mount (repeatable, in order): virtio-fs tag `capsem-fsN`, `rw`, `ro` or `overlay`, and the guest path in hex | none |
//! | `capsem.mode=M` | the agent's mode, passed as `CAPSEM_MODE`: `shell` (one shell, then power off), `persistent` (a fresh shell whenever one exits; only a host `Shutdown` ends the VM), `exec` (one command instead of a shell) | `shell` |

use std::path::PathBuf;

use capsem_host::share::{ShareError, ShareMode, MAX_SHARES};
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
    #[error("capsem.share {value:?} is not TAG,MODE,HEXPATH: {why}")]
    ShareInvalid { value: String, why: String },
    #[error("more than {MAX_SHARES} capsem.share, or one tag or path twice")]
    SharesConflict,
}

/// One `capsem.share=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestShare {
    /// `capsem-fsN`.
    pub tag: String,
    pub mode: ShareMode,
    /// Checked by [`capsem_host::share::check_guest_path`].
    pub path: String,
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
    /// The shares, in command-line order.
    pub shares: Vec<GuestShare>,
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
        shares: Vec::new(),
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
        } else if let Some(value) = word.strip_prefix("capsem.share=") {
            let share = share_param(value)?;
            if out.shares.len() >= MAX_SHARES
                || out
                    .shares
                    .iter()
                    .any(|s| s.tag == share.tag || s.path == share.path)
            {
                return Err(CmdlineError::SharesConflict);
            }
            out.shares.push(share);
        } else if let Some(mode) = word.strip_prefix("capsem.mode=") {
            if !MODES.contains(&mode) {
                return Err(CmdlineError::ModeInvalid(mode.chars().take(32).collect()));
            }
            out.mode = mode.to_owned();
        }
    }
    Ok(out)
}

/// `TAG,MODE,HEX`: tag `capsem-fs` and 1 to 2 digits.
fn share_param(value: &str) -> Result<GuestShare, CmdlineError> {
    let bad = |why: &str| CmdlineError::ShareInvalid {
        value: value.chars().take(64).collect(),
        why: why.into(),
    };
    let mut parts = value.split(',');
    let (Some(tag), Some(mode), Some(hex), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("expected three comma-separated fields"));
    };
    let digits = tag.strip_prefix("capsem-fs").unwrap_or("");
    if digits.is_empty() || digits.len() > 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("the tag is not capsem-fsN"));
    }
    let mode = ShareMode::parse(mode).ok_or_else(|| bad("the mode is not rw, ro or overlay"))?;
    let path = capsem_host::share::unhex(hex)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| bad("the path is not hex of UTF-8"))?;
    capsem_host::share::check_guest_path(&path).map_err(|e: ShareError| bad(&e.to_string()))?;
    Ok(GuestShare {
        tag: tag.into(),
        mode,
        path,
    })
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
    fn shares_accumulate_in_order_and_are_strict() {
        // The golden vector of capsem_host::share::kernel_param.
        let c =
            parse("capsem.share=capsem-fs0,rw,2f77 quiet capsem.share=capsem-fs1,overlay,2f612062")
                .unwrap();
        assert_eq!(
            c.shares,
            [
                GuestShare {
                    tag: "capsem-fs0".into(),
                    mode: ShareMode::Rw,
                    path: "/w".into()
                },
                GuestShare {
                    tag: "capsem-fs1".into(),
                    mode: ShareMode::Overlay,
                    path: "/a b".into()
                },
            ]
        );
        assert!(parse("").unwrap().shares.is_empty());
        for bad in [
            "capsem-fs0,rw",
            "capsem-fs0,rw,2f77,x",
            "fs0,rw,2f77",
            "capsem-fs,rw,2f77",
            "capsem-fs123,rw,2f77",
            "capsem-fsx,rw,2f77",
            "capsem-fs0,rx,2f77",
            "capsem-fs0,rw,2f7",
            "capsem-fs0,rw,zz",
            "capsem-fs0,rw,77",         // relative
            "capsem-fs0,rw,2f",         // "/"
            "capsem-fs0,rw,2f2e2e",     // "/.."
            "capsem-fs0,rw,2f70726f63", // "/proc"
            "capsem-fs0,rw,2fff",       // not UTF-8
        ] {
            assert!(
                matches!(
                    parse(&format!("capsem.share={bad}")),
                    Err(CmdlineError::ShareInvalid { .. })
                ),
                "{bad}"
            );
        }
        for dup in [
            "capsem.share=capsem-fs0,rw,2f77 capsem.share=capsem-fs0,ro,2f78",
            "capsem.share=capsem-fs0,rw,2f77 capsem.share=capsem-fs1,ro,2f77",
        ] {
            assert!(
                matches!(parse(dup), Err(CmdlineError::SharesConflict)),
                "{dup}"
            );
        }
        let many: Vec<String> = (0..=MAX_SHARES)
            .map(|i| {
                format!(
                    "capsem.share=capsem-fs{i},rw,{}",
                    capsem_host::share::hex(format!("/s{i}").as_bytes())
                )
            })
            .collect();
        assert!(matches!(
            parse(&many.join(" ")),
            Err(CmdlineError::SharesConflict)
        ));
    }

    #[test]
    fn ignores_similar_names() {
        let c = parse("xcapsem.token=a capsem.tokens=b").unwrap();
        assert_eq!(c.token, None);
    }
}
