//! Kernel modules, loaded with `finit_module` from lists made at image build
//! time (dependencies first, uncompressed `.ko` files): one for every boot,
//! and one each for shares and the network, loaded only when asked for
//! (each module costs boot time under TCG).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

/// The list the image build writes: one absolute `.ko` path per line,
/// loaded at every boot.
pub const MODULE_LIST: &str = "/etc/capsem/modules";
/// The modules only shares need (virtiofs), loaded when there are shares.
pub const SHARE_MODULE_LIST: &str = "/etc/capsem/modules.share";
/// The modules only the network needs (dummy, nftables), loaded with
/// `capsem.net=1`.
pub const NET_MODULE_LIST: &str = "/etc/capsem/modules.net";

/// Errors reading the list or loading a module.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("cannot read module list {path}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open module {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load module {path}")]
    Load {
        path: PathBuf,
        #[source]
        source: Errno,
    },
}

/// The module paths in `text`, skipping blank lines and `#` comments.
pub fn parse_list(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(PathBuf::from)
        .collect()
}

/// Loads every module in `list`, in order. Returns how many were newly
/// loaded; one that is already loaded (or built in) is not an error.
pub fn load_list(list: &Path) -> Result<usize, ModuleError> {
    let text = std::fs::read_to_string(list).map_err(|source| ModuleError::List {
        path: list.to_owned(),
        source,
    })?;
    let mut loaded = 0;
    for path in parse_list(&text) {
        if load(&path)? {
            loaded += 1;
        }
    }
    Ok(loaded)
}

/// Loads one module; `Ok(false)` when it was already loaded.
fn load(path: &Path) -> Result<bool, ModuleError> {
    let file = File::open(path).map_err(|source| ModuleError::Open {
        path: path.to_owned(),
        source,
    })?;
    let params = c"";
    // SAFETY: finit_module reads the module from an fd we own and keep open
    // for the call, and a NUL-terminated, empty parameter string; flags 0.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if rc == 0 {
        return Ok(true);
    }
    match Errno::last() {
        Errno::EEXIST => Ok(false),
        source => Err(ModuleError::Load {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_skips_comments_and_blanks() {
        let got = parse_list("# order matters\n/lib/a.ko\n\n  /lib/b.ko  \n");
        assert_eq!(
            got,
            vec![PathBuf::from("/lib/a.ko"), PathBuf::from("/lib/b.ko")]
        );
    }

    #[test]
    fn missing_list_is_a_typed_error() {
        let err = load_list(Path::new("/nonexistent/capsem/modules")).unwrap_err();
        assert!(matches!(err, ModuleError::List { .. }));
    }

    #[test]
    fn missing_module_is_a_typed_error() {
        let err = load(Path::new("/nonexistent/x.ko")).unwrap_err();
        assert!(matches!(err, ModuleError::Open { .. }));
    }
}
