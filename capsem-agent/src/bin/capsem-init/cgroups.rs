//! The guest's cgroup tree, made before the agent starts.
//!
//! cgroup2 at `/sys/fs/cgroup` (mounted unless it is already there), the
//! pids and memory controllers enabled in the root's and then in
//! [`PARENT`]'s `cgroup.subtree_control`. `PARENT` holds no process (the
//! "no internal processes" rule): init and the agent stay in the root
//! cgroup, and the agent makes one child of `PARENT` per shell and per
//! command (`capsem-agent/src/cgroup/`). Init also exempts itself from the
//! OOM killer (`oom_score_adj` -1000).

use std::io;
use std::path::Path;

use nix::mount::{mount, MsFlags};

/// Where cgroup2 is mounted.
pub const ROOT: &str = "/sys/fs/cgroup";
/// The parent of every shell's and command's cgroup, named to the agent in
/// `CAPSEM_CGROUP`.
pub const PARENT: &str = "/sys/fs/cgroup/capsem";
/// What each level enables for its children.
const CONTROLLERS: &str = "+pids +memory";

/// Errors preparing the tree.
#[derive(Debug, thiserror::Error)]
pub enum CgroupsError {
    #[error("cannot mount cgroup2 on {ROOT}")]
    Mount(#[source] nix::Error),
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: String,
        value: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {PARENT}")]
    Create(#[source] io::Error),
}

fn write(path: &str, value: &'static str) -> Result<(), CgroupsError> {
    std::fs::write(path, value).map_err(|source| CgroupsError::Write {
        path: path.to_owned(),
        value,
        source,
    })
}

/// Init's own OOM exemption (the kernel spares PID 1 anyway; this says so
/// in `/proc` too).
pub fn protect_self() -> Result<(), CgroupsError> {
    write("/proc/self/oom_score_adj", "-1000")
}

/// Mounts cgroup2 if needed and prepares [`PARENT`]; returns its path.
pub fn setup() -> Result<&'static str, CgroupsError> {
    if !Path::new(ROOT).join("cgroup.controllers").exists() {
        mount(
            Some("cgroup2"),
            ROOT,
            Some("cgroup2"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(CgroupsError::Mount)?;
    }
    write(&format!("{ROOT}/cgroup.subtree_control"), CONTROLLERS)?;
    match std::fs::create_dir(PARENT) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(CgroupsError::Create(e)),
    }
    write(&format!("{PARENT}/cgroup.subtree_control"), CONTROLLERS)?;
    Ok(PARENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_is_under_the_root_and_controllers_are_enabled_with_plus() {
        assert_eq!(Path::new(PARENT).parent(), Some(Path::new(ROOT)));
        assert!(CONTROLLERS
            .split(' ')
            .all(|c| c.starts_with('+') && ["pids", "memory"].contains(&&c[1..])));
    }
}
