//! Host facts that both the `capsem` CLI and capsem-process need, kept in
//! one place so the two never disagree.
//!
//! * [`accel`]: which accelerator QEMU may use here (KVM only where a real
//!   KVM module is loaded and `/dev/kvm` opens), and why.

pub mod accel;
