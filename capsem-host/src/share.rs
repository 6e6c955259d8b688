//! Host directories shared with a guest (`-v HOST_DIR:GUEST_PATH[:MODE]`):
//! the [`Share`] that `vm.json` records, and its two encodings, one for
//! capsem-process's `--share` flag and one for the guest's kernel command
//! line. Both hex-encode the paths, so any byte of a path is safe in an
//! argv element or a space-separated command line.
//!
//! | encoding | form | where |
//! |---|---|---|
//! | [`Share::to_arg`] | `MODE:HEX(HOST):HEX(GUEST)` | `capsem-process --share` |
//! | [`kernel_param`] | `capsem.share=TAG,MODE,HEX(GUEST)` | the guest's command line (capsem-init) |

use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Most shares one VM takes: each costs a virtiofsd and a slice of the
/// kernel command line (2048 bytes on x86).
pub const MAX_SHARES: usize = 8;
/// Longest guest path, in bytes (hex doubles it on the command line).
pub const MAX_GUEST_PATH: usize = 80;
/// Longest host path, in bytes (`PATH_MAX`).
pub const MAX_HOST_PATH: usize = 4096;
/// Guest directories a share may not cover: the guest's own pseudo
/// filesystems and capsem's runtime directory.
pub const RESERVED_GUEST: [&str; 4] = ["/proc", "/sys", "/dev", "/run"];

/// How the guest sees a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShareMode {
    /// Read and write the host directory live.
    Rw,
    /// Read-only (the guest mount and virtiofsd both).
    Ro,
    /// The host directory read-only under an overlay whose changes go to
    /// the VM's writable disk.
    Overlay,
}

impl ShareMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ShareMode::Rw => "rw",
            ShareMode::Ro => "ro",
            ShareMode::Overlay => "overlay",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "rw" => Some(ShareMode::Rw),
            "ro" => Some(ShareMode::Ro),
            "overlay" => Some(ShareMode::Overlay),
            _ => None,
        }
    }

    /// Whether virtiofsd serves the directory read-only.
    pub fn host_readonly(self) -> bool {
        !matches!(self, ShareMode::Rw)
    }
}

impl fmt::Display for ShareMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One share as `vm.json` records it. `host` is canonical (absolute, no
/// symlinks) and UTF-8; `guest` passed [`check_guest_path`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub host: PathBuf,
    pub guest: String,
    pub mode: ShareMode,
}

/// Why a share's encoding or guest path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShareError {
    #[error("expected MODE:HEXPATH:HEXPATH")]
    Form,
    #[error("unknown share mode {0:?} (rw, ro or overlay)")]
    Mode(String),
    #[error("a path is not valid hex")]
    Hex,
    #[error("the host path is not absolute UTF-8 of at most {MAX_HOST_PATH} bytes")]
    Host,
    #[error("guest path {0:?} is not absolute")]
    GuestRelative(String),
    #[error("guest path {0:?} is the root directory")]
    GuestRoot(String),
    #[error("guest path {0:?} has an empty, '.' or '..' component")]
    GuestComponent(String),
    #[error("guest path {0:?} is longer than {MAX_GUEST_PATH} bytes")]
    GuestLong(String),
    #[error("guest path {0:?} has a control character")]
    GuestControl(String),
    #[error("guest path {path:?} is inside {reserved}, which the guest needs for itself")]
    GuestReserved {
        path: String,
        reserved: &'static str,
    },
}

/// An absolute, normalized guest directory that is not `/`, not under
/// [`RESERVED_GUEST`], and at most [`MAX_GUEST_PATH`] bytes.
pub fn check_guest_path(path: &str) -> Result<(), ShareError> {
    let owned = || path.to_owned();
    if !path.starts_with('/') {
        return Err(ShareError::GuestRelative(owned()));
    }
    if path == "/" {
        return Err(ShareError::GuestRoot(owned()));
    }
    if path.len() > MAX_GUEST_PATH {
        return Err(ShareError::GuestLong(owned()));
    }
    if path.chars().any(char::is_control) {
        return Err(ShareError::GuestControl(owned()));
    }
    if path[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(ShareError::GuestComponent(owned()));
    }
    for reserved in RESERVED_GUEST {
        if is_within(path, reserved) {
            return Err(ShareError::GuestReserved {
                path: owned(),
                reserved,
            });
        }
    }
    Ok(())
}

/// Whether guest path `path` is `dir` or below it (both normalized).
pub fn is_within(path: &str, dir: &str) -> bool {
    path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The virtio-fs tag of the `index`th share (at most 36 bytes).
pub fn tag(index: usize) -> String {
    format!("capsem-fs{index}")
}

/// The files in the VM directory that the `index`th share's virtiofsd
/// lives by: its socket and the pid file virtiofsd writes beside it.
/// Removed when the VM stops.
pub fn runtime_files(index: usize) -> [String; 2] {
    [format!("fs-{index}.sock"), format!("fs-{index}.sock.pid")]
}

/// `capsem.share=TAG,MODE,HEX(GUEST)` for the `index`th share.
pub fn kernel_param(index: usize, share: &Share) -> String {
    format!(
        "capsem.share={},{},{}",
        tag(index),
        share.mode,
        hex(share.guest.as_bytes())
    )
}

impl Share {
    /// capsem-process's `--share` value.
    pub fn to_arg(&self) -> String {
        format!(
            "{}:{}:{}",
            self.mode,
            hex(self.host.as_os_str().as_encoded_bytes()),
            hex(self.guest.as_bytes())
        )
    }

    /// Parses [`Share::to_arg`]'s form, checking both paths.
    pub fn parse_arg(s: &str) -> Result<Self, ShareError> {
        let mut parts = s.split(':');
        let (Some(mode), Some(host), Some(guest), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ShareError::Form);
        };
        let mode = ShareMode::parse(mode).ok_or_else(|| ShareError::Mode(mode.into()))?;
        let host = String::from_utf8(unhex(host)?).map_err(|_| ShareError::Host)?;
        if !Path::new(&host).is_absolute()
            || host.len() > MAX_HOST_PATH
            || Path::new(&host)
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        {
            return Err(ShareError::Host);
        }
        let guest = String::from_utf8(unhex(guest)?).map_err(|_| ShareError::Hex)?;
        check_guest_path(&guest)?;
        Ok(Self {
            host: host.into(),
            guest,
            mode,
        })
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Inverse of [`hex`] (either case); odd length or a non-hex digit fails.
pub fn unhex(s: &str) -> Result<Vec<u8>, ShareError> {
    if !s.len().is_multiple_of(2) {
        return Err(ShareError::Hex);
    }
    let digit = |b: u8| (b as char).to_digit(16).ok_or(ShareError::Hex);
    s.as_bytes()
        .chunks(2)
        .map(|pair| Ok((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(host: &str, guest: &str, mode: ShareMode) -> Share {
        Share {
            host: host.into(),
            guest: guest.into(),
            mode,
        }
    }

    #[test]
    fn arg_golden_vector_and_round_trip() {
        let s = share("/h o:me", "/work", ShareMode::Overlay);
        assert_eq!(s.to_arg(), "overlay:2f68206f3a6d65:2f776f726b");
        assert_eq!(Share::parse_arg(&s.to_arg()).unwrap(), s);
        for mode in [ShareMode::Rw, ShareMode::Ro] {
            let s = share("/a", "/b/c", mode);
            assert_eq!(Share::parse_arg(&s.to_arg()).unwrap(), s);
        }
    }

    #[test]
    fn kernel_param_golden_vector() {
        let s = share("/x", "/w d", ShareMode::Ro);
        assert_eq!(kernel_param(3, &s), "capsem.share=capsem-fs3,ro,2f772064");
    }

    #[test]
    fn the_most_shares_fit_the_kernel_command_line() {
        // x86's COMMAND_LINE_SIZE is 2048; the rest of capsem's line
        // (console, token, hostname, disks, tsc, mode) stays under 400.
        let longest = format!("/{}", "a".repeat(MAX_GUEST_PATH - 1));
        let total: usize = (0..MAX_SHARES)
            .map(|i| kernel_param(i, &share("/h", &longest, ShareMode::Overlay)).len() + 1)
            .sum();
        assert!(total + 400 <= 2048, "{total}");
    }

    #[test]
    fn bad_args_are_refused() {
        for bad in [
            "",
            "rw",
            "rw:2f",
            "rw:2f:2f77:x",
            "rw:2:2f77",
            "rw:zz:2f77",
            "rw:61:2f77",     // relative host
            "rw:2f2e2e:2f77", // "/.." host
            "rw:2f:2f",       // guest "/"
            "rw:2f:77",       // guest relative
        ] {
            assert!(Share::parse_arg(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Share::parse_arg("rx:2f:2f77"),
            Err(ShareError::Mode("rx".into()))
        );
    }

    #[test]
    fn guest_paths() {
        for good in ["/work", "/a/b", "/home/user/src", "/runner", "/devx"] {
            assert_eq!(check_guest_path(good), Ok(()), "{good}");
        }
        assert!(matches!(
            check_guest_path("work"),
            Err(ShareError::GuestRelative(_))
        ));
        assert!(matches!(
            check_guest_path("/"),
            Err(ShareError::GuestRoot(_))
        ));
        for bad in ["/a/", "/a//b", "/a/./b", "/a/../b", "/.."] {
            assert!(
                matches!(check_guest_path(bad), Err(ShareError::GuestComponent(_))),
                "{bad}"
            );
        }
        for bad in ["/proc", "/sys/x", "/dev", "/run/capsem"] {
            assert!(
                matches!(check_guest_path(bad), Err(ShareError::GuestReserved { .. })),
                "{bad}"
            );
        }
        let long = format!("/{}", "a".repeat(MAX_GUEST_PATH));
        assert!(matches!(
            check_guest_path(&long),
            Err(ShareError::GuestLong(_))
        ));
        assert!(matches!(
            check_guest_path("/a\nb"),
            Err(ShareError::GuestControl(_))
        ));
    }

    #[test]
    fn within() {
        assert!(is_within("/a/b", "/a"));
        assert!(is_within("/a", "/a"));
        assert!(!is_within("/ab", "/a"));
    }

    #[test]
    fn hex_round_trip() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(&hex(&all)).unwrap(), all);
        assert_eq!(unhex("2F").unwrap(), b"/");
        assert!(unhex("+1").is_err());
    }

    #[test]
    fn vm_json_spelling() {
        let s = share("/h", "/w", ShareMode::Overlay);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"host":"/h","guest":"/w","mode":"overlay"}"#);
        assert_eq!(serde_json::from_str::<Share>(&json).unwrap(), s);
    }
}
