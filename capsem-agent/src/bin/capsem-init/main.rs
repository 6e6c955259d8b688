//! `capsem-init`: PID 1 of a capsem guest VM.
//!
//! Mounts the pseudo filesystems, loads the vsock and disk modules, switches
//! to the real root (the read-only image under an overlay on the VM's
//! writable disk) when the command line names one, mounts the shared host
//! directories, sets the hostname,
//! starts `capsem-agent --transport vsock` with the session token and boot
//! timings from the kernel command line, reaps every orphan, and when the
//! agent ends kills what is left, syncs and powers the VM off. It never
//! exits: any error is printed to the console, then the VM powers off.
//!
//! Modules:
//! - [`boot`]: the sequence and its [`boot::BootError`].
//! - [`cgroups`]: cgroup2, the pids and memory controllers for the agent's
//!   per-command cgroups, init's OOM exemption.
//! - [`cmdline`]: `capsem.token=`, `capsem.hostname=`, `capsem.agent=`,
//!   `capsem.mode=`, `capsem.root=`, `capsem.disk=`, `capsem.share=`,
//!   `capsem.net=`.
//! - [`console`]: timestamped console lines, stdio repair.
//! - [`modules`]: `finit_module` of the lists in `/etc/capsem/modules*`,
//!   independent modules side by side.
//! - [`netup`]: `capsem.net=1`: lo, a dummy default route, nftables redirects.
//! - [`mounts`]: /proc, /sys, /dev, /dev/pts, /dev/shm, /tmp, /run.
//! - [`root`]: finding the disks by serial, the overlay, the switch.
//! - [`shares`]: the host directories (virtio-fs; rw, ro, overlay).
//! - [`power`]: kill everything, reap, sync, power off.
//! - [`reclaim`]: the page cache dropped after 30 s of an idle guest.
//! - [`stages`]: boot stage timestamps for `CAPSEM_BOOT_STAGES`.
//! - [`supervise`]: spawning the agent, the signalfd-driven reaper.
//!
//! Exit codes: none while it is PID 1 (it powers off). Run as any other pid
//! it refuses with exit code 2, so it cannot kill a host's processes.

mod boot;
mod cgroups;
mod cmdline;
mod console;
mod modules;
mod mounts;
mod netup;
mod power;
mod reclaim;
mod root;
mod shares;
mod stages;
mod supervise;

use std::error::Error;

/// Exit code when started as anything but PID 1.
const EXIT_NOT_PID1: i32 = 2;

fn main() {
    if std::process::id() != 1 {
        eprintln!("capsem-init: must run as PID 1 inside a capsem guest");
        #[allow(clippy::exit)] // the documented refusal, before any state exists
        std::process::exit(EXIT_NOT_PID1);
    }
    // A panic would unwind out of main and end PID 1, which panics the
    // kernel; report it and power off instead.
    std::panic::set_hook(Box::new(|info| {
        log!("panic: {info}");
        power::power_off();
    }));
    if let Err(e) = boot::run() {
        let mut msg = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            msg.push_str(&format!(": {c}"));
            cause = c.source();
        }
        log!("error: {msg}");
    }
    power::shutdown()
}
