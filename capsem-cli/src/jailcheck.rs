//! `capsem doctor`'s lines on the host jail: whom QEMU and
//! vhost-device-vsock run as, and whether per-VM cgroup v2 limits can be
//! applied here (and why not, in one line).

use capsem_host::cgroup::{Base, Unavailable};
use capsem_host::jail::{UID_BASE, UID_END};

use crate::health::{Check, Status};

/// The jail's lines for a host where we run as `euid`, with the cgroup
/// probe's answer.
pub fn checks(euid: u32, limits: &Result<Base, Unavailable>) -> Vec<Check> {
    vec![check_vmm_user(euid), check_limits(limits)]
}

pub fn check_vmm_user(euid: u32) -> Check {
    const WHAT: &str = "vmm jail";
    if euid == 0 {
        Check::new(
            Status::Ok,
            WHAT,
            format!(
                "qemu and vhost-device-vsock run as a uid per VM ({UID_BASE}+slot, below {UID_END}) \
                 with no capabilities and no_new_privs; qemu under its seccomp sandbox"
            ),
        )
    } else {
        Check::new(
            Status::Ok,
            WHAT,
            format!(
                "qemu and vhost-device-vsock run as you (uid {euid}) with no_new_privs; \
                 qemu under its seccomp sandbox"
            ),
        )
    }
}

pub fn check_limits(limits: &Result<Base, Unavailable>) -> Check {
    const WHAT: &str = "host limits";
    match limits {
        Ok(base) => Check::new(
            Status::Ok,
            WHAT,
            format!(
                "memory, pids and cpu per VM in cgroup v2 under {}",
                base.dir.display()
            ),
        ),
        Err(why) => Check::new(
            Status::Warn,
            WHAT,
            format!("cannot be applied, VMs run without them: {why}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn root_and_user_jails_are_described() {
        let root = check_vmm_user(0).render();
        assert!(root.starts_with("ok       vmm jail: "), "{root}");
        assert!(root.contains("1879048192+slot"), "{root}");
        let user = check_vmm_user(1000).render();
        assert!(user.contains("run as you (uid 1000)"), "{user}");
    }

    #[test]
    fn limits_say_where_or_why_not_in_one_line() {
        let ok = check_limits(&Ok(Base {
            dir: "/sys/fs/cgroup/capsem".into(),
            parent: None,
        }));
        assert_eq!(ok.status, Status::Ok);
        assert!(ok.detail.contains("/sys/fs/cgroup/capsem"));
        let no = check_limits(&Err(Unavailable::NoControllers {
            mount: PathBuf::from("/sys/fs/cgroup/unified"),
            missing: "memory, pids, cpu".into(),
        }));
        assert_eq!(no.status, Status::Warn);
        let line = no.render();
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(
            line.contains("/sys/fs/cgroup/unified lacks the memory, pids, cpu"),
            "{line}"
        );
        assert_eq!(checks(0, &Err(Unavailable::NotMounted)).len(), 2);
    }
}
