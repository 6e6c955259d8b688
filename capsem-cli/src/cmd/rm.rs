//! `capsem rm [--force] NAME`: removes a VM's directory and everything in
//! it, then its lock file, and prints the name (one line on stdout).
//!
//! A `running` or `orphaned` VM is refused unless `--force`, which stops it
//! first ([`crate::vmctl::stop_vm`], 10 s of grace) and then checks that
//! none of its processes is left. This holds for temporary VMs too (their
//! ids, `tmp-...`, are accepted): `rm --force` of a temporary VM whose
//! owner still runs kills it, and the owning `capsem shell` or `capsem run`
//! sees its session end.

use std::io;
use std::path::Path;
use std::time::Duration;

use capsem_host::lock;

use crate::context::{check_name, Ctx};
use crate::error::CliError;
use crate::exit::Exit;
use crate::output::write_stdout;
use crate::vmctl::stop_vm;
use crate::vms::{Vm, VmState};

/// How long `rm --force` lets the VM stop gracefully before killing it.
pub const FORCE_GRACE: Duration = Duration::from_secs(10);

/// Removes VM `name`; exit code 0.
pub fn run(ctx: &Ctx, name: &str, force: bool) -> Result<Exit, CliError> {
    // Before the lock: the name becomes part of the lock file's path.
    check_name(name)?;
    let _lock = ctx.lock(name)?;
    let vm = ctx.load(name)?;
    check_removable(&vm, force)?;
    if vm.state() != VmState::Stopped {
        stop_vm(ctx, &vm, FORCE_GRACE)?;
        let vm = ctx.load(name)?;
        if vm.state() != VmState::Stopped {
            return Err(CliError::WrongState {
                name: name.into(),
                state: vm.state(),
                hint: "; it did not stop, so it was not removed",
            });
        }
    }
    remove(ctx, &vm.dir, name)?;
    write_stdout(format!("{name}\n").as_bytes())?;
    Ok(Exit::OK)
}

/// Refuses a VM with live processes unless `force`.
fn check_removable(vm: &Vm, force: bool) -> Result<(), CliError> {
    match vm.state() {
        VmState::Stopped => Ok(()),
        _ if force => Ok(()),
        state => Err(CliError::WrongState {
            name: vm.name.clone(),
            state,
            hint: "; stop it first (capsem stop NAME) or use --force",
        }),
    }
}

/// Removes the VM directory, then the lock file (the caller holds the
/// lock): whoever takes the lock afterwards finds no VM.
fn remove(ctx: &Ctx, dir: &Path, name: &str) -> Result<(), CliError> {
    std::fs::remove_dir_all(dir).map_err(|source| CliError::Io {
        what: format!("cannot remove {}", dir.display()),
        source,
    })?;
    let lock_file = lock::lock_path(&ctx.home, name);
    match std::fs::remove_file(&lock_file) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        // The VM is gone; a leftover lock file is harmless.
        Err(e) => eprintln!(
            "capsem: warning: cannot remove {}: {e}",
            lock_file.display()
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{config, ctx, gone_record, make_vm, Marked};
    use capsem_host::vmstate::Pids;

    #[test]
    fn removes_a_stopped_vm_and_its_lock_file() {
        let home = tempfile::tempdir().unwrap();
        let ctx = ctx(home.path());
        let pids = Pids {
            process: gone_record("capsem-process"),
            guest: vec![],
            cid: None,
        };
        let dir = make_vm(
            home.path(),
            "dev",
            Some(&config("dev", false, None)),
            Some(&pids),
        );
        std::fs::create_dir(dir.join("scratch")).unwrap();
        std::fs::write(dir.join("scratch/f"), b"x").unwrap();
        let other = make_vm(
            home.path(),
            "other",
            Some(&config("other", false, None)),
            None,
        );

        assert_eq!(run(&ctx, "dev", false).unwrap(), Exit::OK);
        assert!(!dir.exists());
        assert!(!lock::lock_path(home.path(), "dev").exists());
        assert!(other.exists(), "only the named VM");
        assert!(matches!(
            run(&ctx, "dev", false),
            Err(CliError::NoSuchVm(_))
        ));
        assert!(matches!(
            run(&ctx, "../other", true),
            Err(CliError::Name { .. })
        ));
        assert!(other.exists());
    }

    #[test]
    fn refuses_a_running_or_orphaned_vm_without_force() {
        let home = tempfile::tempdir().unwrap();
        let ctx = ctx(home.path());
        let mut process = Marked::spawn("capsem-process");
        let mut guest = Marked::spawn("capsem-agent");
        let running = Pids {
            process: process.record.clone(),
            guest: vec![],
            cid: None,
        };
        let orphaned = Pids {
            process: gone_record("capsem-process"),
            guest: vec![guest.record.clone()],
            cid: None,
        };
        let a = make_vm(
            home.path(),
            "a",
            Some(&config("a", false, None)),
            Some(&running),
        );
        let b = make_vm(
            home.path(),
            "b",
            Some(&config("b", false, None)),
            Some(&orphaned),
        );
        for (name, state) in [("a", VmState::Running), ("b", VmState::Orphaned)] {
            match run(&ctx, name, false) {
                Err(e @ CliError::WrongState { .. }) => {
                    assert!(
                        e.to_string()
                            .contains(&format!("is {state}; stop it first")),
                        "{e}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(a.exists() && b.exists());
        assert!(process.running() && guest.running());
        process.finish();
        guest.finish();
    }
}
