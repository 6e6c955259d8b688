//! capsem's wire protocols.
//!
//! Two conversations use this crate:
//!
//! * host <-> guest, over vsock (or the Unix sockets vhost-device-vsock
//!   delivers as `<uds>_<port>`): [`guest::HostToGuest`] and
//!   [`guest::GuestToHost`] on the control port; [`terminal::TermToHost`]
//!   and [`terminal::HostToTerm`] on the terminal port (output chunks, then
//!   the shell's exit status, on one stream).
//! * host <-> guest on the exec port: [`exec::HostToExec`] and
//!   [`exec::ExecToHost`], one non-interactive command per connection.
//! * host <-> guest on the audit port: [`audit::AuditToHost`] and
//!   [`audit::HostToAudit`], one record per execve in the guest.
//! * host <-> guest on the network port: [`net::NetToHost`] and
//!   [`net::HostToNet`], one egress question per connection.
//! * host -> guest on the publish port: [`publish::HostToPublish`] and
//!   [`publish::PublishToHost`], one published-port connection each.
//! * CLI <-> capsem-process, over `<vm-dir>/ctl.sock`: [`ipc::ClientToProcess`]
//!   and [`ipc::ProcessToClient`].
//!
//! Modules:
//!
//! * [`frame`]: the 4-byte big-endian length prefix, the incremental
//!   [`frame::FrameDecoder`] (need-more vs invalid vs truncated-at-EOF) and the
//!   role-typed [`frame::Codec`] that only encodes what its side may send and
//!   only decodes what its side may receive.
//! * [`conn`]: framed connections (`read_frame` / `write_frame`), blocking
//!   and, with the `tokio` feature, async.
//! * [`guest`]: host/guest control messages, ports and limits.
//! * [`terminal`]: terminal-port messages.
//! * [`exec`]: exec-port messages, their bounds and the environment checks.
//! * [`audit`]: audit-port messages and their bounds.
//! * [`net`]: network-port messages and their bounds.
//! * [`publish`]: publish-port messages and their bounds.
//! * [`ipc`]: CLI/host-process messages.
//!
//! Every message is MessagePack with named fields, adjacently tagged
//! (`{"t": <variant>, "c": <fields>}`). `docs/protocol.md` shows golden bytes
//! for every variant; the tests at the bottom of each module pin them.

pub mod audit;
pub mod conn;
pub mod exec;
pub mod frame;
pub mod guest;
pub mod ipc;
pub mod net;
pub mod publish;
pub mod terminal;

pub use frame::{Codec, FrameDecoder, FrameError, Role};
