//! Whom a VM's daemons (QEMU, vhost-device-vsock) run as when capsem runs
//! as root: a uid (and gid) per VM from a reserved range, so no
//! `/etc/passwd` entry or install step is needed and two running VMs never
//! share one (each slot is leased host-wide while its VM runs).
//! capsem-process applies it (`vmm::jail`); `capsem doctor`
//! reports it.

/// The first uid of the range: 0x70000000, in the block systemd's uid map
/// leaves unassigned (above its container ranges, below 2^31).
pub const UID_BASE: u32 = 0x7000_0000;
/// Slots are 3 up to 3 + 4096 (capsem-process's `vmm::cid` and
/// `vmm::jail`), so VM uids stay below this.
pub const UID_END: u32 = UID_BASE + 0x1100;

// A uid at or above 2^31 confuses readers that take uids as signed.
const _: () = assert!(UID_END < 0x8000_0000);

/// The uid and gid of the VM holding uid slot `slot`.
pub fn vm_uid(slot: u32) -> u32 {
    UID_BASE + slot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_uids_are_in_the_reserved_range() {
        assert_eq!(vm_uid(3), 0x7000_0003);
        assert!(vm_uid(3 + 4095) < UID_END);
    }
}
