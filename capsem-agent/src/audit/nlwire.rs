//! The kernel audit subsystem's netlink wire format: message headers,
//! `struct audit_status`, `struct audit_rule_data`, and splitting a
//! datagram into messages. Kernel constants and structs are defined here
//! because libc does not carry them; [`super::netlink`] owns the socket.

// include/uapi/linux/netlink.h
pub(super) const NLMSG_HDRLEN: usize = 16;
pub(super) const NLMSG_NOOP: u16 = 1;
pub(super) const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;

// include/uapi/linux/audit.h
pub(super) const AUDIT_GET: u16 = 1000;
pub(super) const AUDIT_SET: u16 = 1001;
pub(super) const AUDIT_ADD_RULE: u16 = 1011;
pub(super) const AUDIT_DEL_RULE: u16 = 1012;
/// Types from here on are records; below are requests and replies.
pub(super) const AUDIT_FIRST_USER_MSG: u16 = 1100;
pub(super) const AUDIT_STATUS_ENABLED: u32 = 0x0001;
pub(super) const AUDIT_STATUS_PID: u32 = 0x0004;
pub(super) const AUDIT_STATUS_BACKLOG_LIMIT: u32 = 0x0010;
pub(super) const AUDIT_FILTER_EXIT: u32 = 0x04;
pub(super) const AUDIT_ALWAYS: u32 = 2;
/// The rule field that compares the syscall's architecture.
pub(super) const AUDIT_ARCH: u32 = 11;
pub(super) const AUDIT_EQUAL: u32 = 0x4000_0000;
pub(super) const AUDIT_BITMASK_SIZE: usize = 64;
pub(super) const AUDIT_MAX_FIELDS: usize = 64;
/// `audit_enabled` value of a configuration locked until reboot.
pub(super) const AUDIT_LOCKED: u32 = 2;

/// Architectures the rules cover on this build: `(AUDIT_ARCH_*, required)`.
/// The 32-bit compat rule is best effort.
#[cfg(target_arch = "x86_64")]
pub(super) const RULE_ARCHES: &[(u32, bool)] = &[(0xC000_003E, true), (0x4000_0003, false)];
#[cfg(target_arch = "aarch64")]
pub(super) const RULE_ARCHES: &[(u32, bool)] = &[(0xC000_00B7, true)];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(super) const RULE_ARCHES: &[(u32, bool)] = &[];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStatus {
    pub mask: u32,
    pub enabled: u32,
    pub failure: u32,
    pub pid: u32,
    pub rate_limit: u32,
    pub backlog_limit: u32,
    pub lost: u32,
    pub backlog: u32,
}

/// `struct audit_status` is 11 `u32`s in 6.1; the kernel copies at most
/// what it knows and zero-fills the rest.
pub(super) const STATUS_WORDS: usize = 11;

impl AuditStatus {
    pub(super) fn to_bytes(self) -> Vec<u8> {
        let words = [
            self.mask,
            self.enabled,
            self.failure,
            self.pid,
            self.rate_limit,
            self.backlog_limit,
            self.lost,
            self.backlog,
        ];
        let mut out = Vec::with_capacity(STATUS_WORDS * 4);
        for w in words.iter().chain(std::iter::repeat(&0)).take(STATUS_WORDS) {
            out.extend_from_slice(&w.to_ne_bytes());
        }
        out
    }

    pub(super) fn from_bytes(b: &[u8]) -> Option<Self> {
        let w = |i: usize| -> Option<u32> {
            let s = b.get(i * 4..i * 4 + 4)?;
            Some(u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
        };
        Some(Self {
            mask: w(0)?,
            enabled: w(1)?,
            failure: w(2)?,
            pid: w(3)?,
            rate_limit: w(4)?,
            backlog_limit: w(5)?,
            lost: w(6)?,
            backlog: w(7)?,
        })
    }
}

/// `struct audit_rule_data` (no string fields): an exit-filter rule that
/// always audits `syscalls` of architecture `arch`.
pub fn rule_payload(arch: u32, syscalls: &[u64]) -> Vec<u8> {
    let mut mask = [0u32; AUDIT_BITMASK_SIZE];
    for &nr in syscalls {
        let nr = nr as usize;
        if nr / 32 < AUDIT_BITMASK_SIZE {
            mask[nr / 32] |= 1 << (nr % 32);
        }
    }
    let mut fields = [0u32; AUDIT_MAX_FIELDS];
    let mut values = [0u32; AUDIT_MAX_FIELDS];
    let mut flags = [0u32; AUDIT_MAX_FIELDS];
    fields[0] = AUDIT_ARCH;
    values[0] = arch;
    flags[0] = AUDIT_EQUAL;
    let head = [AUDIT_FILTER_EXIT, AUDIT_ALWAYS, 1];
    let words = head
        .iter()
        .chain(&mask)
        .chain(&fields)
        .chain(&values)
        .chain(&flags)
        .chain(&[0u32]); // buflen
    words.flat_map(|w| w.to_ne_bytes()).collect()
}

/// One netlink request: header and payload.
pub(super) fn request(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + payload.len()) as u32;
    let mut out = Vec::with_capacity(len as usize);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(payload);
    out
}

/// One message of a datagram from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// `NLMSG_ERROR`: `errno` 0 is an acknowledgement of request `seq`.
    Ack { seq: u32, errno: i32 },
    /// A reply to a request (`AUDIT_GET`).
    Reply {
        kind: u16,
        seq: u32,
        payload: &'a [u8],
    },
    /// An audit record: its type and text.
    Record { kind: u16, text: &'a str },
    /// Anything else (`NLMSG_NOOP`, `NLMSG_DONE`, a malformed tail).
    Other,
}

pub(super) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at + 2)?;
    Some(u16::from_ne_bytes([s[0], s[1]]))
}

pub(super) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 4)?;
    Some(u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// Splits a datagram into its messages. A record runs to the end of the
/// datagram (see the module doc); its text is lossily UTF-8 and stripped of
/// trailing NULs.
pub fn messages(dgram: &[u8]) -> Vec<Message<'_>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= dgram.len() {
        let (Some(len), Some(kind), Some(seq)) = (
            u32_at(dgram, off),
            u16_at(dgram, off + 4),
            u32_at(dgram, off + 8),
        ) else {
            break;
        };
        let body_at = off + NLMSG_HDRLEN;
        if kind >= AUDIT_FIRST_USER_MSG {
            let text = &dgram[body_at..];
            let end = text.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            match std::str::from_utf8(&text[..end]) {
                Ok(text) => out.push(Message::Record { kind, text }),
                // The kernel escapes what is not printable ASCII; anything
                // else is not a record this parser could read.
                Err(_) => out.push(Message::Other),
            }
            break;
        }
        let len = len as usize;
        if len < NLMSG_HDRLEN || off + len > dgram.len() {
            out.push(Message::Other);
            break;
        }
        let payload = &dgram[body_at..off + len];
        out.push(match kind {
            NLMSG_ERROR => match (u32_at(payload, 0), u32_at(payload, 4 + 8)) {
                (Some(err), Some(req_seq)) => Message::Ack {
                    seq: req_seq,
                    errno: -(err as i32),
                },
                _ => Message::Other,
            },
            NLMSG_NOOP | NLMSG_DONE => Message::Other,
            _ => Message::Reply { kind, seq, payload },
        });
        // NLMSG_ALIGN
        off += (len + 3) & !3;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: u32, kind: u16, seq: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&len.to_ne_bytes());
        h.extend_from_slice(&kind.to_ne_bytes());
        h.extend_from_slice(&0u16.to_ne_bytes());
        h.extend_from_slice(&seq.to_ne_bytes());
        h.extend_from_slice(&0u32.to_ne_bytes());
        h
    }

    #[test]
    fn rule_layout_matches_audit_rule_data() {
        let rule = rule_payload(0xC000_003E, &[59, 322]);
        // flags, action, field_count, mask[64], fields[64], values[64],
        // fieldflags[64], buflen.
        assert_eq!(rule.len(), 4 * (3 + 4 * 64 + 1));
        let word = |i: usize| u32_at(&rule, i * 4).unwrap();
        assert_eq!(word(0), AUDIT_FILTER_EXIT);
        assert_eq!(word(1), AUDIT_ALWAYS);
        assert_eq!(word(2), 1);
        let mask = |n: usize| word(3 + n);
        assert_eq!(mask(59 / 32), 1 << (59 % 32));
        assert_eq!(mask(322 / 32), 1 << (322 % 32));
        assert_eq!((0..64).filter(|&i| mask(i) != 0).count(), 2);
        assert_eq!(word(3 + 64), AUDIT_ARCH);
        assert_eq!(word(3 + 128), 0xC000_003E);
        assert_eq!(word(3 + 192), AUDIT_EQUAL);
        assert_eq!(word(3 + 256), 0, "buflen");
    }

    #[test]
    fn requests_and_status_round_trip() {
        let st = AuditStatus {
            mask: AUDIT_STATUS_PID,
            enabled: 1,
            pid: 42,
            backlog_limit: 8192,
            ..AuditStatus::default()
        };
        let bytes = st.to_bytes();
        assert_eq!(bytes.len(), STATUS_WORDS * 4);
        assert_eq!(AuditStatus::from_bytes(&bytes), Some(st));
        assert_eq!(AuditStatus::from_bytes(&bytes[..20]), None);
        let req = request(AUDIT_SET, NLM_F_ACK, 7, &bytes);
        assert_eq!(u32_at(&req, 0), Some((NLMSG_HDRLEN + bytes.len()) as u32));
        assert_eq!(u16_at(&req, 4), Some(AUDIT_SET));
        assert_eq!(u16_at(&req, 6), Some(NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(u32_at(&req, 8), Some(7));
    }

    #[test]
    fn datagrams_split_into_acks_replies_and_records() {
        // An error message: -EEXIST, then the request's header (seq 5).
        let mut d = header(16 + 4 + 16, NLMSG_ERROR, 0);
        d.extend_from_slice(&(-libc::EEXIST).to_ne_bytes());
        d.extend_from_slice(&header(1056, AUDIT_ADD_RULE, 5));
        assert_eq!(
            messages(&d),
            vec![Message::Ack {
                seq: 5,
                errno: libc::EEXIST
            }]
        );
        // A reply followed by an ack in one datagram.
        let mut d = header(16 + 8, AUDIT_GET, 3);
        d.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0]);
        let mut ack = header(16 + 4 + 16, NLMSG_ERROR, 0);
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend_from_slice(&header(16, AUDIT_GET, 3));
        d.extend_from_slice(&ack);
        let got = messages(&d);
        assert_eq!(got.len(), 2);
        assert!(
            matches!(got[0], Message::Reply { kind: AUDIT_GET, seq: 3, payload } if payload.len() == 8)
        );
        assert_eq!(got[1], Message::Ack { seq: 3, errno: 0 });
        // A record whose nlmsg_len excludes the header, NUL-padded.
        let text = b"audit(1.000:1): cwd=\"/\"";
        let mut d = header(text.len() as u32, 1307, 0);
        d.extend_from_slice(text);
        d.extend_from_slice(&[0, 0, 0]);
        assert_eq!(
            messages(&d),
            vec![Message::Record {
                kind: 1307,
                text: "audit(1.000:1): cwd=\"/\""
            }]
        );
        // Garbage never panics.
        assert!(messages(&[1, 2, 3]).is_empty());
        assert_eq!(messages(&header(9999, AUDIT_GET, 1)), vec![Message::Other]);
    }
}
