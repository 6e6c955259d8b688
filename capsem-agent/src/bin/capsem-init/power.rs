//! The end of the guest: stop every process, flush, power off.

use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{pause, sync, Pid};

use crate::log;
use crate::supervise::reap_all;

/// Kills every process but PID 1, reaps them, syncs and powers the VM off.
/// Never returns: PID 1 exiting would panic the kernel.
pub fn shutdown() -> ! {
    // kill(-1) reaches every process except PID 1 itself; ESRCH means none.
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    reap_all();
    power_off()
}

/// Syncs and powers off without touching other processes (also the last
/// resort of the panic hook).
pub fn power_off() -> ! {
    // Persistent VMs are stopped gracefully (host Shutdown): flush their disk.
    sync();
    log!("powering off");
    // reboot() returns only on failure (its Ok type is uninhabited).
    let e = reboot(RebootMode::RB_POWER_OFF).map_or_else(|e| e, |never| match never {});
    log!("power off failed: {e}; halting");
    let e = reboot(RebootMode::RB_HALT_SYSTEM).map_or_else(|e| e, |never| match never {});
    log!("halt failed: {e}; idling forever");
    // Only reached if both calls failed (they need CAP_SYS_BOOT).
    loop {
        pause();
    }
}
