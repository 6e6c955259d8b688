//! The host's limits on a VM's daemons: a cgroup v2 per VM where the host
//! can take one (`capsem_host::cgroup` has the rules and the writer); the
//! daemons join it between fork and exec (`vmm::jail`).

use capsem_host::cgroup::{self, VmCgroup};

use crate::config::Config;

/// The VM's cgroup, where the host can take limits; where it cannot, the
/// VM runs without them (`capsem doctor` says why).
pub fn host_limits(vm_id: &str, cfg: &Config, tcg: bool) -> Option<VmCgroup> {
    let base = match cgroup::probe() {
        Ok(base) => base,
        Err(why) => {
            tracing::info!("vm {}: no host cgroup limits: {why}", vm_id);
            return None;
        }
    };
    let limits = cgroup::Limits::for_vm(cfg.memory_mib, cfg.cpus, tcg);
    match base.create(vm_id, &limits) {
        Ok(cg) => {
            tracing::info!(
                "vm {}: host limits {limits:?} in {}",
                vm_id,
                cg.dir().display()
            );
            Some(cg)
        }
        Err(e) => {
            tracing::warn!(
                "vm {}: no host cgroup limits: {}",
                vm_id,
                crate::log::chain(&e)
            );
            None
        }
    }
}
