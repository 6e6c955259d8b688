//! The kernel audit subsystem over netlink, without auditd.
//!
//! [`Netlink::open`] creates a `NETLINK_AUDIT` socket, reads the current
//! status (`AUDIT_GET`), adds one exit-filter rule per architecture that
//! always audits `execve` and `execveat` (`AUDIT_ADD_RULE`), and registers the
//! agent as the audit daemon (`AUDIT_SET`: enabled, our pid, a larger
//! backlog), so the kernel unicasts every record to this socket. It refuses
//! to take over from another registered daemon and to touch a locked
//! configuration. [`Netlink::close`] undoes what it changed: the pid, the
//! enabled flag and the backlog limit go back to what `AUDIT_GET` reported,
//! and the rules it added are deleted.
//!
//! Records arrive as one netlink message each: the header's type is the
//! record type and the payload is the text `audit(...): ...` (the kernel's
//! `nlmsg_len` for records does not follow the netlink convention, so the
//! text is taken to the end of the datagram). Kernel constants and structs
//! are defined here because libc does not carry them.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    self, recvfrom, sendto, setsockopt, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use tracing::{debug, warn};

use super::parse::EXEC_SYSCALLS;
use crate::fdio;

// include/uapi/linux/netlink.h
const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;

// include/uapi/linux/audit.h
const AUDIT_GET: u16 = 1000;
const AUDIT_SET: u16 = 1001;
const AUDIT_ADD_RULE: u16 = 1011;
const AUDIT_DEL_RULE: u16 = 1012;
/// Types from here on are records; below are requests and replies.
const AUDIT_FIRST_USER_MSG: u16 = 1100;
const AUDIT_STATUS_ENABLED: u32 = 0x0001;
const AUDIT_STATUS_PID: u32 = 0x0004;
const AUDIT_STATUS_BACKLOG_LIMIT: u32 = 0x0010;
const AUDIT_FILTER_EXIT: u32 = 0x04;
const AUDIT_ALWAYS: u32 = 2;
/// The rule field that compares the syscall's architecture.
const AUDIT_ARCH: u32 = 11;
const AUDIT_EQUAL: u32 = 0x4000_0000;
const AUDIT_BITMASK_SIZE: usize = 64;
const AUDIT_MAX_FIELDS: usize = 64;
/// `audit_enabled` value of a configuration locked until reboot.
const AUDIT_LOCKED: u32 = 2;

/// Architectures the rules cover on this build: `(AUDIT_ARCH_*, required)`.
/// The 32-bit compat rule is best effort.
#[cfg(target_arch = "x86_64")]
const RULE_ARCHES: &[(u32, bool)] = &[(0xC000_003E, true), (0x4000_0003, false)];
#[cfg(target_arch = "aarch64")]
const RULE_ARCHES: &[(u32, bool)] = &[(0xC000_00B7, true)];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const RULE_ARCHES: &[(u32, bool)] = &[];

/// The kernel's backlog limit while the agent is the audit daemon (records
/// queued before kauditd hands them to the socket; the default is 64).
const BACKLOG_LIMIT: u32 = 8192;
/// Receive buffer asked for: a burst of execs waits here, not in the kernel.
const RCVBUF: usize = 8 * 1024 * 1024;
/// How long the kernel has to answer one request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest datagram read; records are at most about 9 KiB.
const RECV_BUF: usize = 64 * 1024;
/// Records stashed while waiting for a reply.
const STASH_CAP: usize = 1024;
/// Datagrams read per [`Netlink::read_available`], so that the reader sees
/// its stop signal even while the kernel keeps sending.
const READ_BATCH: usize = 1024;

/// Errors talking to the kernel audit subsystem.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a NETLINK_AUDIT socket (no audit support in this kernel?)")]
    Socket(#[source] Errno),
    #[error("no audit rule architecture for this build")]
    Arch,
    #[error("cannot send {op} to the kernel")]
    Send {
        op: &'static str,
        #[source]
        source: Errno,
    },
    #[error("cannot read from the audit socket")]
    Recv(#[source] io::Error),
    #[error("the kernel refused {op}")]
    Refused {
        op: &'static str,
        #[source]
        source: Errno,
    },
    #[error("no answer from the kernel to {op} within {REPLY_TIMEOUT:?}")]
    Timeout { op: &'static str },
    #[error("malformed reply to {op}")]
    Malformed { op: &'static str },
    #[error("the audit configuration is locked until reboot")]
    Locked,
    #[error("pid {0} is already the audit daemon")]
    Owned(u32),
}

/// `struct audit_status`, the fields the agent uses.
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
const STATUS_WORDS: usize = 11;

impl AuditStatus {
    fn to_bytes(self) -> Vec<u8> {
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

    fn from_bytes(b: &[u8]) -> Option<Self> {
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
fn request(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
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

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at + 2)?;
    Some(u16::from_ne_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
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

/// What waiting for a request's answer returned.
enum Answer {
    Ack,
    Reply(Vec<u8>),
}

/// The agent's audit socket, registered with the kernel.
#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
    prev: AuditStatus,
    /// Rules this agent added (and deletes on close).
    added: Vec<Vec<u8>>,
    /// `AUDIT_SET` made this process the audit daemon.
    registered: bool,
    /// Records that arrived while a reply was awaited.
    stash: VecDeque<(u16, String)>,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens the socket, adds the exec rules and registers this process.
    pub fn open() -> Result<Self, NetlinkError> {
        if RULE_ARCHES.is_empty() {
            return Err(NetlinkError::Arch);
        }
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkAudit,
        )
        .map_err(NetlinkError::Socket)?;
        // As root the limit can be passed; otherwise rmem_max caps it.
        if let Err(e) = setsockopt(&fd, sockopt::RcvBufForce, &RCVBUF) {
            debug!(error = %e, "SO_RCVBUFFORCE refused; trying SO_RCVBUF");
            if let Err(e) = setsockopt(&fd, sockopt::RcvBuf, &RCVBUF) {
                warn!(error = %e, "cannot raise the audit socket's receive buffer");
            }
        }
        let mut nl = Self {
            fd,
            seq: 0,
            prev: AuditStatus::default(),
            added: Vec::new(),
            registered: false,
            stash: VecDeque::new(),
            buf: vec![0u8; RECV_BUF],
        };
        let prev = match nl.call("AUDIT_GET", AUDIT_GET, 0, &[], Some(AUDIT_GET))? {
            Answer::Reply(p) => {
                AuditStatus::from_bytes(&p).ok_or(NetlinkError::Malformed { op: "AUDIT_GET" })?
            }
            Answer::Ack => return Err(NetlinkError::Malformed { op: "AUDIT_GET" }),
        };
        nl.prev = prev;
        if prev.enabled == AUDIT_LOCKED {
            return Err(NetlinkError::Locked);
        }
        let me = std::process::id();
        if prev.pid != 0 && prev.pid != me {
            return Err(NetlinkError::Owned(prev.pid));
        }
        for &(arch, required) in RULE_ARCHES {
            let Some((_, nrs)) = EXEC_SYSCALLS.iter().find(|(a, _)| *a == arch) else {
                continue;
            };
            let rule = rule_payload(arch, nrs);
            match nl.call("AUDIT_ADD_RULE", AUDIT_ADD_RULE, NLM_F_ACK, &rule, None) {
                Ok(_) => nl.added.push(rule),
                // Left by an earlier agent in this boot: in place, not ours.
                Err(NetlinkError::Refused {
                    source: Errno::EEXIST,
                    ..
                }) => {}
                Err(e) if !required => {
                    warn!(arch = format_args!("{arch:#x}"), error = %e, "optional audit rule not added");
                }
                Err(e) => {
                    nl.close();
                    return Err(e);
                }
            }
        }
        let set = AuditStatus {
            mask: AUDIT_STATUS_ENABLED | AUDIT_STATUS_PID | AUDIT_STATUS_BACKLOG_LIMIT,
            enabled: 1,
            pid: me,
            backlog_limit: prev.backlog_limit.max(BACKLOG_LIMIT),
            ..AuditStatus::default()
        };
        if let Err(e) = nl.call("AUDIT_SET", AUDIT_SET, NLM_F_ACK, &set.to_bytes(), None) {
            nl.close();
            return Err(e);
        }
        nl.registered = true;
        Ok(nl)
    }

    /// The status before the agent changed it.
    pub fn previous(&self) -> AuditStatus {
        self.prev
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Hands the records waiting on the socket (at most [`READ_BATCH`]
    /// datagrams, and any stashed while a reply was awaited) to `f`, without
    /// blocking.
    pub fn read_available(&mut self, f: &mut dyn FnMut(u16, &str)) -> Result<(), NetlinkError> {
        while let Some((kind, text)) = self.stash.pop_front() {
            f(kind, &text);
        }
        for _ in 0..READ_BATCH {
            let n = match self.recv()? {
                Some(n) => n,
                None => return Ok(()),
            };
            for m in messages(&self.buf[..n]) {
                if let Message::Record { kind, text } = m {
                    f(kind, text);
                }
            }
        }
        Ok(())
    }

    /// One datagram from the kernel into `buf`; `None` when none is waiting.
    fn recv(&mut self) -> Result<Option<usize>, NetlinkError> {
        loop {
            match recvfrom::<NetlinkAddr>(std::os::fd::AsRawFd::as_raw_fd(&self.fd), &mut self.buf)
            {
                // Only the kernel (port 0) speaks here.
                Ok((n, Some(from))) if from.pid() == 0 => return Ok(Some(n)),
                Ok(_) => continue,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(Errno::EINTR) => continue,
                Err(Errno::ENOBUFS) => {
                    warn!("audit socket overrun: the kernel dropped records");
                    continue;
                }
                Err(e) => return Err(NetlinkError::Recv(e.into())),
            }
        }
    }

    /// Sends one request and waits for its answer: the reply of type `reply`
    /// when given, else the acknowledgement. Records that arrive meanwhile
    /// are stashed for [`Netlink::read_available`].
    fn call(
        &mut self,
        op: &'static str,
        kind: u16,
        flags: u16,
        payload: &[u8],
        reply: Option<u16>,
    ) -> Result<Answer, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let msg = request(kind, flags, seq, payload);
        sendto(
            std::os::fd::AsRawFd::as_raw_fd(&self.fd),
            &msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(|source| NetlinkError::Send { op, source })?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let Some(n) = self.recv()? else {
                let mut fds = [fdio::pollfd(self.fd.as_fd(), fdio::IN)];
                if fdio::poll(&mut fds, Some(deadline)).map_err(NetlinkError::Recv)? == 0 {
                    return Err(NetlinkError::Timeout { op });
                }
                continue;
            };
            let mut answer = None;
            for m in messages(&self.buf[..n]) {
                match m {
                    Message::Ack { seq: s, errno } if s == seq => {
                        answer = Some(if errno == 0 {
                            Ok(Answer::Ack)
                        } else {
                            Err(NetlinkError::Refused {
                                op,
                                source: Errno::from_raw(errno),
                            })
                        });
                    }
                    Message::Reply {
                        kind: k,
                        seq: s,
                        payload,
                    } if Some(k) == reply && s == seq => {
                        answer = Some(Ok(Answer::Reply(payload.to_vec())));
                    }
                    Message::Record { kind, text } if self.stash.len() < STASH_CAP => {
                        self.stash.push_back((kind, text.to_owned()));
                    }
                    _ => {}
                }
            }
            if let Some(a) = answer {
                return a;
            }
        }
    }

    /// Gives the kernel back its previous configuration: no daemon pid, the
    /// previous enabled flag and backlog limit, without the rules added
    /// here. Failures are logged; the socket closes either way.
    pub fn close(mut self) {
        let prev = self.prev;
        let restore = AuditStatus {
            mask: AUDIT_STATUS_ENABLED | AUDIT_STATUS_PID | AUDIT_STATUS_BACKLOG_LIMIT,
            enabled: prev.enabled,
            pid: 0,
            backlog_limit: prev.backlog_limit,
            ..AuditStatus::default()
        };
        // Nothing to restore when open() failed before registering.
        if self.registered {
            if let Err(e) = self.call("AUDIT_SET", AUDIT_SET, NLM_F_ACK, &restore.to_bytes(), None)
            {
                debug!(error = %e, "audit status not restored");
            }
        }
        for rule in std::mem::take(&mut self.added) {
            if let Err(e) = self.call("AUDIT_DEL_RULE", AUDIT_DEL_RULE, NLM_F_ACK, &rule, None) {
                warn!(error = %e, "audit rule not deleted");
            }
        }
    }
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
