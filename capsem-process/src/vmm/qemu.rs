//! `--vmm qemu`: not implemented yet. It will spawn vhost-device-vsock
//! (`--uds-path <vm-dir>/vsock.sock`) and qemu through the reaper, each with
//! `setsid` in `pre_exec`, and report both as [`GuestBackend::children`].

use super::{GuestBackend, Launch, VmmError};
use crate::reaper::Child;

#[derive(Debug)]
pub struct Qemu {
    children: Vec<Child>,
}

impl Qemu {
    pub fn start(_launch: &Launch<'_>) -> Result<Self, VmmError> {
        Err(VmmError::QemuUnavailable)
    }
}

impl GuestBackend for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }
    fn children(&self) -> &[Child] {
        &self.children
    }
}
