//! A home this user cannot read: every command says so and exits 125
//! (before the fix, `capsem list` printed an empty table and exited 0).
//!
//! Mode bits do not stop root, so as root the CLI runs as `nobody`
//! (`setpriv --reuid=65534 --regid=65534 --clear-groups`) against a home
//! of mode 0700 owned by root; as any other user the home gets mode 0000.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

/// `capsem ARGS` as a user who cannot read `home`.
fn capsem_locked_out(home: &Path, args: &[&str]) -> Output {
    let bin = env!("CARGO_BIN_EXE_capsem");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = if root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            bin,
        ]);
        c
    } else {
        Command::new(bin)
    };
    cmd.arg("--home")
        .arg(home)
        .args(args)
        .env_remove("CAPSEM_HOME")
        .env_remove("CAPSEM_VMM")
        .env("CAPSEM_PROCESS_BIN", "/nonexistent/capsem-process")
        .output()
        .expect("run capsem")
}

/// Restores the mode on drop so the temporary directory can be removed.
struct Locked<'a>(&'a Path);

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = fs::set_permissions(self.0, fs::Permissions::from_mode(0o700));
    }
}

#[test]
fn every_command_on_an_unreadable_home_says_so_and_exits_125() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // The parent must be searchable by the other user, the home not
    // readable by it.
    let parent = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(parent.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let home = parent.path().join("home");
    fs::create_dir_all(home.join("vms/dev")).expect("a VM");
    fs::write(home.join("vms/dev/vm.json"), "{}").expect("vm.json");
    let mode = if root { 0o700 } else { 0o000 };
    fs::set_permissions(&home, fs::Permissions::from_mode(mode)).expect("chmod");
    let _restore = Locked(&home);

    for args in [
        &["list"][..],
        &["list", "--json"],
        &["inspect", "dev"],
        &["logs", "dev"],
        &["audit", "dev"],
        &["rm", "dev"],
        &["stop", "dev"],
        &["exec", "dev", "--", "true"],
        &["create", "new"],
        &["--vmm", "none", "run", "--", "true"],
        &["--vmm", "none", "shell"],
    ] {
        let out = capsem_locked_out(&home, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: printed {:?}", out.stdout);
        let line = stderr
            .lines()
            .find(|l| !l.starts_with("capsem: warning:"))
            .unwrap_or_default();
        assert!(
            line.starts_with(&format!(
                "capsem: cannot read capsem's home {}",
                home.display()
            )),
            "{args:?}: {stderr}"
        );
        assert!(line.contains("Permission denied"), "{args:?}: {stderr}");
    }
    // Nothing was changed in it.
    drop(_restore);
    assert!(home.join("vms/dev/vm.json").exists());
    assert_eq!(fs::read_dir(home.join("vms")).expect("vms").count(), 1);
}
