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
//! and the rules it added are deleted; opened with [`OnClose::Leave`]
//! (inside a VM, whose kernel ends with the agent) it only closes.
//!
//! Records arrive as one netlink message each: the header's type is the
//! record type and the payload is the text `audit(...): ...` (the kernel's
//! `nlmsg_len` for records does not follow the netlink convention, so the
//! text is taken to the end of the datagram). The wire format (constants,
//! structs, message splitting) is in [`super::nlwire`].

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

use super::nlwire::*;
use super::parse::EXEC_SYSCALLS;
use crate::fdio;

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
/// What waiting for a request's answer returned.
enum Answer {
    Ack,
    Reply(Vec<u8>),
}

/// What [`Netlink::close`] does to the kernel's audit configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnClose {
    /// Gives the kernel back what it had (a host's kernel outlives us).
    Restore,
    /// Leaves it: inside a VM the kernel ends with the agent, and the
    /// restore's netlink round trips cost a temporary VM's exit about 40 ms
    /// under TCG.
    Leave,
}

/// The agent's audit socket, registered with the kernel.
#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
    on_close: OnClose,
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
    pub fn open(on_close: OnClose) -> Result<Self, NetlinkError> {
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
            on_close,
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
    /// here, unless it was opened with [`OnClose::Leave`]. Failures are
    /// logged; the socket closes either way.
    pub fn close(mut self) {
        if self.on_close == OnClose::Leave {
            return;
        }
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
