//! The files that describe a VM in `<home>/vms/<name>/`, shared by the CLI
//! (which writes `vm.json` and reads everything) and capsem-process (which
//! writes `pids.json`, `status.json` and `token`). Every write is atomic: a
//! temporary file in the same directory, fsync, rename.
//!
//! | file | writer | what |
//! |---|---|---|
//! | `vm.json` | CLI (`create`, temporary VMs at start) | [`VmConfig`]: name, persistence, creation time, resources, disk size, OCI image, shares, published ports |
//! | `pids.json` | capsem-process, after the guest started; removed at its teardown | [`Pids`]: capsem-process and the guest's host processes with their identities |
//! | `status.json` | capsem-process, on each change | [`VmStatusFile`]: agent connections, the last shell exit |
//! | `token` | capsem-process (0600) | the session token, so a new capsem-process can adopt a running guest |

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::identity::ProcRecord;

pub const VM_FILE: &str = "vm.json";
pub const PIDS_FILE: &str = "pids.json";
pub const STATUS_FILE: &str = "status.json";
pub const TOKEN_FILE: &str = "token";

/// Longest VM name.
pub const MAX_NAME_LEN: usize = 48;

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Why a VM name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a VM name must not be empty")]
    Empty,
    #[error("a VM name is at most {MAX_NAME_LEN} characters")]
    TooLong,
    #[error(
        "a VM name starts with a letter or a digit and has only letters, digits, '-', '_' and '.'"
    )]
    Charset,
    #[error("names starting with \"tmp-\" are reserved for temporary VMs")]
    Reserved,
}

/// Checks a user-given VM name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most
/// [`MAX_NAME_LEN`], not `tmp-*`. Such a name is one path component that is
/// never `.` or `..`.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let first = name.bytes().next().ok_or(NameError::Empty)?;
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if !first.is_ascii_alphanumeric()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(NameError::Charset);
    }
    if name.starts_with("tmp-") {
        return Err(NameError::Reserved);
    }
    Ok(())
}

/// `vm.json`: what the VM is. Stable across `stop` and `start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub name: String,
    pub temporary: bool,
    /// RFC 3339, UTC.
    pub created: String,
    /// `qemu` or `none`.
    pub vmm: String,
    /// `auto`, `kvm` or `tcg`, as asked for.
    pub accel: String,
    pub cpus: u32,
    pub memory_mib: u32,
    /// The CLI that owns a temporary VM; the VM is swept once it is gone.
    #[serde(default)]
    pub owner: Option<ProcRecord>,
    /// The writable disk's size in bytes, used when it is first made
    /// (`None`: capsem-process's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size: Option<u64>,
    /// The OCI image whose root filesystem the VM boots (`None`: the
    /// default image's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<VmImage>,
    /// `create --idle-timeout`: stop after this long with no client
    /// attached and no exec running (milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// `create --max-duration`: stop this long after each start
    /// (milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration_ms: Option<u64>,
    /// The egress policy as `--net` values (`capsem_net::Policy::to_args`);
    /// empty: `--net none`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<String>,
    /// Host directories shared with the guest (`-v`), in the order given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<crate::share::Share>,
    /// Published ports (`-p`), in the order given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<crate::publish::Publish>,
}

/// An OCI image as `vm.json` records it: what was asked for and the
/// manifest digest it resolved to (the cache key under `images/oci/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmImage {
    pub reference: String,
    /// `sha256:<hex>`.
    pub digest: String,
}

/// `pids.json`: the host processes of a running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pids {
    pub process: ProcRecord,
    /// The agent (`none`), or vhost-device-vsock and qemu.
    pub guest: Vec<ProcRecord>,
    #[serde(default)]
    pub cid: Option<u32>,
}

/// How the last shell ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShellExit {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// RFC 3339, UTC.
    pub at: String,
}

/// `status.json`: what capsem-process last knew.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatusFile {
    /// The accelerator in use (`kvm`, `tcg`), or `none`.
    pub accel: Option<String>,
    /// The guest image directory.
    pub image: Option<String>,
    /// The agent's own connection count, from its latest hello.
    pub agent_connects: u64,
    /// Host-side connection generation (restarts with capsem-process).
    pub generation: u64,
    pub shell_pid: Option<u32>,
    pub last_shell_exit: Option<ShellExit>,
    /// How many times capsem-process booted this VM.
    #[serde(default)]
    pub boots: u64,
    /// How many times a capsem-process adopted a running guest.
    #[serde(default)]
    pub adoptions: u64,
    /// Why capsem-process stopped the VM on its own (`idle timeout 5s`,
    /// `max duration 2h`); cleared at the next boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
}

/// Reads a JSON file; `Ok(None)` when it does not exist.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, VmStateError> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(VmStateError::Read {
                path: path.into(),
                source,
            })
        }
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| VmStateError::Parse {
            path: path.into(),
            source,
        })
}

/// Writes `value` as pretty JSON to `path` atomically, mode 0600.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), VmStateError> {
    let mut text = serde_json::to_vec_pretty(value).map_err(|source| VmStateError::Parse {
        path: path.into(),
        source,
    })?;
    text.push(b'\n');
    write_atomic(path, &text)
}

/// Replaces `path` with `data` (mode 0600) through a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), VmStateError> {
    let err = |source| VmStateError::Write {
        path: path.into(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Now, as RFC 3339 UTC with seconds.
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs())
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(secs: u64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm), to avoid a date crate
    // for one format.
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "dev-1", "A.b_c", "9lives"] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name(&"a".repeat(49)), Err(NameError::TooLong));
        for bad in [".", "..", "../x", "a/b", "-a", ".hidden", "a b", "é", "a\0"] {
            assert_eq!(validate_name(bad), Err(NameError::Charset), "{bad:?}");
        }
        assert_eq!(validate_name("tmp-1"), Err(NameError::Reserved));
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn json_round_trip_is_atomic_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(STATUS_FILE);
        assert_eq!(read_json::<VmStatusFile>(&p).unwrap(), None);
        let s = VmStatusFile {
            agent_connects: 3,
            ..Default::default()
        };
        write_json(&p, &s).unwrap();
        assert_eq!(read_json::<VmStatusFile>(&p).unwrap(), Some(s));
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "no temp file left"
        );
        fs::write(&p, b"{").unwrap();
        assert!(matches!(
            read_json::<VmStatusFile>(&p),
            Err(VmStateError::Parse { .. })
        ));
    }
}
