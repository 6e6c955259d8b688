//! Host <-> guest messages on the audit port ([`crate::guest::PORT_AUDIT`]):
//! one record per `execve` in the guest, from the kernel audit subsystem.
//!
//! Each connection generation of the agent opens one audit connection after
//! its control hello was acknowledged and sends [`AuditToHost::Hello`] with
//! the session token and the generation number it was given; the host keeps
//! only the newest generation's audit connection. Then the guest sends
//! [`AuditToHost::Record`]s in the order the kernel emitted them; the host
//! answers [`HostToAudit::Ack`] once a record is stored. Records not yet
//! acknowledged when a connection is lost are sent again on the next one,
//! and the host drops any record whose `serial` is not above the last one
//! it stored: none is lost, none is stored twice.
//!
//! Every string is bounded ([`MAX_AUDIT_FIELD`], [`MAX_AUDIT_ARGS`]); the
//! agent truncates, the host refuses oversized frames.

use serde::{Deserialize, Serialize};

/// Largest number of argv elements carried per record (more are dropped
/// and `argv_truncated` is set).
pub const MAX_AUDIT_ARGS: usize = 256;
/// Largest string field (an argv element, exe, cwd, tty), in bytes.
pub const MAX_AUDIT_FIELD: usize = 1024;
/// Largest audit frame either side accepts.
pub const MAX_AUDIT_FRAME: usize = 64 * 1024;

/// One execve, as the kernel audited it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The kernel's audit event serial (`audit(SECS.MILLIS:SERIAL)`),
    /// increasing over the guest's life.
    pub serial: u64,
    /// The event time, milliseconds since the Unix epoch (guest clock).
    pub time_ms: u64,
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    /// The executable (`exe=`), as the kernel resolved it.
    pub exe: String,
    /// The arguments (`EXECVE` record), lossily UTF-8.
    pub argv: Vec<String>,
    /// More arguments than [`MAX_AUDIT_ARGS`], or an element was cut.
    pub argv_truncated: bool,
    /// The working directory (`CWD` record).
    pub cwd: String,
    /// The controlling terminal (`tty=`), `(none)` when there is none.
    pub tty: String,
    /// Whether the execve succeeded.
    pub success: bool,
    /// The kernel's audit id, `SECS.MILLIS:SERIAL`.
    pub audit_id: String,
}

/// Messages the guest sends on the audit port. The host decodes only these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum AuditToHost {
    /// First message: the session token and the control generation this
    /// audit connection belongs to.
    Hello { token: String, generation: u64 },
    /// One execve.
    Record(AuditRecord),
}

/// Messages the host sends on the audit port. The guest decodes only these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", content = "c", rename_all = "snake_case")]
pub enum HostToAudit {
    /// Every record up to and including `serial` is stored.
    Ack { serial: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{AuditGuest, AuditHost, Codec};

    fn record() -> AuditRecord {
        AuditRecord {
            serial: 7,
            time_ms: 1_700_000_000_123,
            pid: 42,
            ppid: 1,
            uid: 0,
            exe: "/bin/true".into(),
            argv: vec!["/bin/true".into(), "audit-1".into()],
            argv_truncated: false,
            cwd: "/root".into(),
            tty: "pts0".into(),
            success: true,
            audit_id: "1700000000.123:7".into(),
        }
    }

    #[test]
    fn round_trip_and_roles() {
        for msg in [
            AuditToHost::Hello {
                token: "ab".into(),
                generation: 3,
            },
            AuditToHost::Record(record()),
        ] {
            let frame = Codec::<AuditGuest>::encode(&msg).unwrap();
            let mut host = Codec::<AuditHost>::new();
            host.feed(&frame).unwrap();
            assert_eq!(host.next_message().unwrap(), Some(msg));
        }
        let ack = HostToAudit::Ack { serial: 9 };
        let frame = Codec::<AuditHost>::encode(&ack).unwrap();
        let mut guest = Codec::<AuditGuest>::new();
        guest.feed(&frame).unwrap();
        assert_eq!(guest.next_message().unwrap(), Some(ack));
    }

    #[test]
    fn golden_ack() {
        let frame = Codec::<AuditHost>::encode(&HostToAudit::Ack { serial: 9 }).unwrap();
        // {"t":"ack","c":{"serial":9}}
        assert_eq!(
            frame,
            b"\x00\x00\x00\x12\x82\xa1t\xa3ack\xa1c\x81\xa6serial\x09".to_vec()
        );
    }
}
