//! capsem's wire protocols.
//!
//! Two conversations use this crate:
//!
//! * host <-> guest, over vsock (or the Unix sockets vhost-device-vsock
//!   delivers as `<uds>_<port>`): [`guest::HostToGuest`] and
//!   [`guest::GuestToHost`] on the control port; the terminal port carries raw
//!   shell bytes and never a frame.
//! * host <-> guest on the exec port: [`exec::HostToExec`] and
//!   [`exec::ExecToHost`], one non-interactive command per connection.
//! * host <-> guest on the audit port: [`audit::AuditToHost`] and
//!   [`audit::HostToAudit`], one record per execve in the guest.
//! * CLI <-> capsem-process, over `<vm-dir>/ctl.sock`: [`ipc::ClientToProcess`]
//!   and [`ipc::ProcessToClient`].
//!
//! Modules:
//!
//! * [`frame`]: the 4-byte big-endian length prefix, the incremental
//!   [`frame::FrameDecoder`] (need-more vs invalid vs truncated-at-EOF) and the
//!   role-typed [`frame::Codec`] that only encodes what its side may send and
//!   only decodes what its side may receive.
//! * [`guest`]: host/guest messages, ports and limits.
//! * [`exec`]: exec-port messages, their bounds and the environment checks.
//! * [`audit`]: audit-port messages and their bounds.
//! * [`ipc`]: CLI/host-process messages.
//!
//! Every message is MessagePack with named fields, adjacently tagged
//! (`{"t": <variant>, "c": <fields>}`). `docs/protocol.md` shows golden bytes
//! for every variant; the tests at the bottom of each module pin them.

pub mod audit;
pub mod exec;
pub mod frame;
pub mod guest;
pub mod ipc;

pub use frame::{Codec, FrameDecoder, FrameError, Role};
