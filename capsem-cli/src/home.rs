//! capsem's home directory, the VM directories under it, and VM ids.

use std::ffi::OsStr;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// Errors finding or preparing directories.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("cannot find a home directory: pass --home or set CAPSEM_HOME or HOME")]
    NoHome,
    #[error("cannot resolve {path}")]
    Absolute {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read capsem's home {path}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot draw a random VM id")]
    Random(#[source] getrandom::Error),
}

/// The home directory: `--home`, else `$CAPSEM_HOME`, else `<user home>/.capsem`.
/// Empty values count as unset.
pub fn resolve_home(
    flag: Option<&Path>,
    env: Option<&OsStr>,
    user_home: Option<&Path>,
) -> Result<PathBuf, HomeError> {
    let chosen = if let Some(p) = flag.filter(|p| !p.as_os_str().is_empty()) {
        p.to_path_buf()
    } else if let Some(e) = env.filter(|e| !e.is_empty()) {
        PathBuf::from(e)
    } else if let Some(h) = user_home.filter(|h| !h.as_os_str().is_empty()) {
        h.join(".capsem")
    } else {
        return Err(HomeError::NoHome);
    };
    std::path::absolute(&chosen).map_err(|source| HomeError::Absolute {
        path: chosen,
        source,
    })
}

/// Fails unless this process can list the home and its `vms/` (each may
/// not exist yet: capsem creates them). Without it, a home that belongs to
/// someone else would read as one with no VMs.
pub fn check_readable(home: &Path) -> Result<(), HomeError> {
    for dir in [home.to_path_buf(), vms_dir(home)] {
        match fs::read_dir(&dir) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(HomeError::Unreadable { path: dir, source }),
        }
    }
    Ok(())
}

/// The user's home: `$HOME`, else the password database.
pub fn user_home() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(h));
    }
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.dir)
}

/// `<home>/vms`.
pub fn vms_dir(home: &Path) -> PathBuf {
    home.join("vms")
}

/// A temporary VM id: `tmp-` and 16 lowercase hex digits.
pub fn format_temp_id(bytes: [u8; 8]) -> String {
    let mut id = String::with_capacity(20);
    id.push_str("tmp-");
    for b in bytes {
        id.push_str(&format!("{b:02x}"));
    }
    id
}

/// A fresh temporary VM id from the OS random source.
pub fn new_temp_id() -> Result<String, HomeError> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).map_err(HomeError::Random)?;
    Ok(format_temp_id(bytes))
}

/// A VM directory this process created; removed when dropped (every exit
/// path, unwinding included).
#[derive(Debug)]
pub struct VmDir {
    path: PathBuf,
}

impl VmDir {
    /// Creates `<home>/vms/` (0700, with parents) if needed and then a new
    /// `<home>/vms/<id>/` (0700). Fails if the VM directory already exists.
    pub fn create(home: &Path, id: &str) -> Result<Self, HomeError> {
        let vms = vms_dir(home);
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&vms)
            .map_err(|source| HomeError::Create {
                path: vms.clone(),
                source,
            })?;
        let path = vms.join(id);
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| HomeError::Create {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves `process.log` out of the VM directory to `<home>/logs/<id>.process.log`
    /// so it survives the directory's removal; returns where it went.
    pub fn keep_log(&self, home: &Path, id: &str) -> Option<PathBuf> {
        let log = self.path.join("process.log");
        if !log.is_file() {
            return None;
        }
        let logs = home.join("logs");
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&logs)
            .ok()?;
        let kept = logs.join(format!("{id}.process.log"));
        fs::rename(&log, &kept).ok()?;
        Some(kept)
    }
}

impl Drop for VmDir {
    fn drop(&mut self) {
        // capsem-process removes a temporary VM's directory itself; this
        // covers a process that died or was killed first.
        match fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("capsem: cannot remove {}: {e}", self.path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn home_resolution_order() {
        let flag = Path::new("/flag");
        let env = OsStr::new("/env");
        let user = Path::new("/user");
        assert_eq!(
            resolve_home(Some(flag), Some(env), Some(user)).unwrap(),
            PathBuf::from("/flag")
        );
        assert_eq!(
            resolve_home(None, Some(env), Some(user)).unwrap(),
            PathBuf::from("/env")
        );
        assert_eq!(
            resolve_home(None, None, Some(user)).unwrap(),
            PathBuf::from("/user/.capsem")
        );
        assert_eq!(
            resolve_home(None, Some(OsStr::new("")), Some(user)).unwrap(),
            PathBuf::from("/user/.capsem")
        );
        assert!(matches!(
            resolve_home(None, None, None),
            Err(HomeError::NoHome)
        ));
    }

    #[test]
    fn a_missing_home_is_readable_a_file_is_not() {
        let d = tempfile::tempdir().unwrap();
        check_readable(&d.path().join("new")).unwrap();
        check_readable(d.path()).unwrap();
        fs::create_dir(vms_dir(d.path())).unwrap();
        check_readable(d.path()).unwrap();
        let file = d.path().join("file");
        fs::write(&file, b"").unwrap();
        let e = check_readable(&file).unwrap_err();
        assert!(matches!(e, HomeError::Unreadable { .. }), "{e:?}");
        assert!(e.to_string().contains("cannot read capsem's home"), "{e}");
    }

    #[test]
    fn relative_home_becomes_absolute() {
        let got = resolve_home(Some(Path::new("rel")), None, None).unwrap();
        assert!(got.is_absolute());
        assert!(got.ends_with("rel"));
    }

    #[test]
    fn temp_id_format() {
        assert_eq!(
            format_temp_id([0, 1, 0xab, 0xff, 0x10, 0x20, 0x30, 0x40]),
            "tmp-0001abff10203040"
        );
        let id = new_temp_id().unwrap();
        assert_eq!(id.len(), 20);
        assert!(id.starts_with("tmp-"));
        assert!(id[4..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(id, new_temp_id().unwrap());
    }

    #[test]
    fn vm_dir_is_private_and_removed_on_drop() {
        let home = tempfile::tempdir().unwrap();
        let dir = VmDir::create(home.path(), "tmp-x").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&vms_dir(home.path())), 0o700);
        assert_eq!(mode(dir.path()), 0o700);
        fs::write(dir.path().join("file"), b"x").unwrap();
        assert!(
            VmDir::create(home.path(), "tmp-x").is_err(),
            "must be fresh"
        );
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
        assert!(vms_dir(home.path()).exists());
    }

    #[test]
    fn keep_log_moves_the_log_out() {
        let home = tempfile::tempdir().unwrap();
        let dir = VmDir::create(home.path(), "tmp-y").unwrap();
        assert_eq!(dir.keep_log(home.path(), "tmp-y"), None);
        fs::write(dir.path().join("process.log"), b"boom\n").unwrap();
        let kept = dir.keep_log(home.path(), "tmp-y").unwrap();
        drop(dir);
        assert_eq!(fs::read(kept).unwrap(), b"boom\n");
    }
}
