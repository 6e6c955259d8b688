//! Host facts that the `capsem` CLI, capsem-process, the agent and the test
//! harness share, kept in one place so they never disagree.
//!
//! * [`accel`]: which accelerator QEMU may use here (KVM only where a real
//!   KVM module is loaded and `/dev/kvm` opens), and why.
//! * [`cgroup`]: per-VM cgroup v2 limits, where the host can take them.
//! * [`jail`]: the uid a VM's daemons run as under root.
//! * [`identity`]: a pid with its start time and an exact argv element,
//!   checked before any signal.
//! * [`lock`]: the per-VM command lock.
//! * [`vmstate`]: the files describing a VM (`vm.json`, `pids.json`,
//!   `status.json`, `token`) and VM names.
//! * [`pidfd`]: a process's exit as a pollable fd.
//! * [`resources`]: a VM's default vCPUs and memory, and disk sizes.
//! * [`tsc`]: the host's TSC rate, told to TCG guests.
//! * [`share`]: host directories shared with a guest (`-v`) and their
//!   encodings for capsem-process and the guest's command line.
//! * [`publish`]: published ports (`-p`) and their one spelling.

pub mod accel;
pub mod cgroup;
pub mod identity;
pub mod jail;
pub mod lock;
pub mod pidfd;
pub mod publish;
pub mod resources;
pub mod share;
pub mod tsc;
pub mod vmstate;
