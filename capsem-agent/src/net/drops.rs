//! The packets the guest's firewall drops, told to the host so that each
//! leaves a deny record in `net.jsonl`. capsem-init's `filter_out` chains
//! end in `log group` [`DROP_GROUP`] before their drop policy (UDP other
//! than DNS, ICMP, raw IP, all IPv6); here:
//!
//! * [`NflogSocket`]: the nfnetlink_log socket bound to that group, its
//!   messages parsed by rust-netlink's `netlink-packet-netfilter`;
//! * [`parse_ip_packet`]: the destination of a logged packet (the kernel
//!   copies its first [`SNAPLEN`] bytes: the IP header and the ports);
//! * [`Tally`]: counts per destination, at most [`MAX_DESTS`] of them
//!   between two flushes (the rest only counted as lost);
//! * [`serve`]: the `net-drops` thread, which reads the socket and every
//!   [`FLUSH_EVERY`] asks the host one `Dropped` question per destination;
//!   at the stop it tells what is left within [`LAST_WAIT`] (the host's
//!   listeners outlive the agent, so a command's last drops are recorded
//!   before the VM is gone: `capsem run --audit-log` has them).
//!
//! The records say what the guest's kernel logged; a compromised guest can
//! delete the rule or invent drops, and nothing leaves either way (there is
//! no network card). The rule's `limit` bounds the kernel's copies, the
//! tally bounds the agent's memory, and the host rate-limits the questions.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use capsem_proto::net::{HostToNet, NetToHost};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    config_request, ConfigCmd, ConfigMode, ConfigNla, PacketNla, ULogMessage,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use nix::sys::socket::{self, AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType};
use tracing::{debug, warn};

use super::ask::Host;
use crate::fdio;
use crate::stop::StopSignal;

/// The nfnetlink_log group of capsem-init's `log` rules.
pub const DROP_GROUP: u16 = 849;
/// Bytes of each dropped packet the kernel copies: an IPv6 header (40) and
/// a UDP or TCP header's ports.
pub const SNAPLEN: u32 = 48;
/// Drops are told to the host this long after the first of a batch.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Destinations counted between two flushes; drops to others are lost.
pub const MAX_DESTS: usize = 64;
/// One `Dropped` question's wait for the host.
const ASK_WAIT: Duration = Duration::from_secs(2);
/// The last batch's whole wait, at the stop.
pub const LAST_WAIT: Duration = Duration::from_secs(1);
/// The receive buffer: many netlink messages a read.
const RECV_BUF: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DropsError {
    #[error("cannot open the nfnetlink_log socket")]
    Socket(#[source] nix::Error),
    #[error("cannot bind nfnetlink_log group {DROP_GROUP}")]
    Send(#[source] io::Error),
    #[error("no answer to binding nfnetlink_log group {DROP_GROUP}")]
    NoAck,
    #[error("the kernel refused nfnetlink_log group {DROP_GROUP}: error {0}")]
    Refused(i32),
}

/// The IP protocol of a dropped packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Other(u8),
}

impl Proto {
    fn from_number(n: u8) -> Self {
        match n {
            6 => Self::Tcp,
            17 => Self::Udp,
            1 => Self::Icmp,
            58 => Self::Icmpv6,
            n => Self::Other(n),
        }
    }

    /// Its name in the `Dropped` question.
    pub fn name(self) -> String {
        match self {
            Self::Tcp => "tcp".into(),
            Self::Udp => "udp".into(),
            Self::Icmp => "icmp".into(),
            Self::Icmpv6 => "icmpv6".into(),
            Self::Other(n) => format!("ip-{n}"),
        }
    }

    fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp)
    }
}

/// Where a dropped packet was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dest {
    pub proto: Proto,
    pub ip: IpAddr,
    pub port: Option<u16>,
}

fn port_at(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at + 2)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

/// The destination of an IPv4 or IPv6 packet from its first bytes; `None`
/// for anything too short to say. (IPv6 extension headers are not
/// followed: such a packet counts under its first next-header number.)
pub fn parse_ip_packet(bytes: &[u8]) -> Option<Dest> {
    match bytes.first()? >> 4 {
        4 => {
            let ihl = usize::from(bytes[0] & 0x0f) * 4;
            if ihl < 20 || bytes.len() < 20 {
                return None;
            }
            let proto = Proto::from_number(bytes[9]);
            let ip = Ipv4Addr::new(bytes[16], bytes[17], bytes[18], bytes[19]);
            let port = proto.has_ports().then(|| port_at(bytes, ihl + 2)).flatten();
            Some(Dest {
                proto,
                ip: IpAddr::V4(ip),
                port,
            })
        }
        6 => {
            let dst: [u8; 16] = bytes.get(24..40)?.try_into().ok()?;
            let proto = Proto::from_number(bytes[6]);
            let port = proto.has_ports().then(|| port_at(bytes, 42)).flatten();
            Some(Dest {
                proto,
                ip: IpAddr::V6(Ipv6Addr::from(dst)),
                port,
            })
        }
        _ => None,
    }
}

/// Drops counted per destination between two flushes.
#[derive(Debug, Default)]
pub struct Tally {
    counts: HashMap<Dest, u32>,
    lost: u64,
}

impl Tally {
    pub fn add(&mut self, dest: Dest) {
        if let Some(n) = self.counts.get_mut(&dest) {
            *n = n.saturating_add(1);
        } else if self.counts.len() < MAX_DESTS {
            self.counts.insert(dest, 1);
        } else {
            self.lost += 1;
        }
    }

    /// Drops the kernel could not deliver (a full socket buffer).
    pub fn lost(&mut self, n: u64) {
        self.lost += n;
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty() && self.lost == 0
    }

    /// The counts, in order, and the lost; the tally is empty after.
    pub fn take(&mut self) -> (Vec<(Dest, u32)>, u64) {
        let mut counts: Vec<_> = self.counts.drain().collect();
        counts.sort();
        (counts, std::mem::take(&mut self.lost))
    }
}

/// The nfnetlink_log socket bound to [`DROP_GROUP`].
#[derive(Debug)]
pub struct NflogSocket {
    fd: OwnedFd,
}

impl NflogSocket {
    /// Opens the socket and binds the group (copying [`SNAPLEN`] bytes of
    /// each packet); the kernel's answer is awaited within a second.
    pub fn open() -> Result<Self, DropsError> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(DropsError::Socket)?;
        socket::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, 0),
        )
        .map_err(DropsError::Socket)?;
        let sock = Self { fd };
        let request = config_request(
            NetfilterProtoFamily::Unspec,
            DROP_GROUP,
            // The kernel batches up to 100 messages or a second by
            // default: one message at a time, so that a command's last drop
            // is read before the agent stops.
            vec![
                ConfigCmd::Bind.into(),
                ConfigMode::new_packet(SNAPLEN).into(),
                ConfigNla::QThresh(1),
            ],
        );
        let mut buf = vec![0u8; request.buffer_len()];
        request.serialize(&mut buf);
        fdio::write(sock.fd.as_fd(), &buf).map_err(DropsError::Send)?;
        sock.await_ack().map(|()| sock)
    }

    fn await_ack(&self) -> Result<(), DropsError> {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let mut fds = [fdio::pollfd(self.fd.as_fd(), fdio::IN)];
            let _ = fdio::poll(&mut fds, Some(deadline));
            if Instant::now() >= deadline && !fdio::ready(&fds[0]) {
                return Err(DropsError::NoAck);
            }
            let n = match fdio::read(self.fd.as_fd(), &mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(DropsError::Send(e)),
            };
            for msg in messages(&buf[..n]) {
                if let NetlinkPayload::Error(e) = msg.payload {
                    return match e.code {
                        None => Ok(()),
                        Some(code) => Err(DropsError::Refused(code.get())),
                    };
                }
            }
        }
    }

    /// Reads every waiting message into `tally`.
    pub fn receive(&self, buf: &mut [u8], tally: &mut Tally) {
        loop {
            let n = match fdio::read(self.fd.as_fd(), buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // The kernel dropped log messages: at least one is lost.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    tally.lost(1);
                    continue;
                }
                Err(e) => {
                    warn!("drops: receive failed: {e}");
                    return;
                }
            };
            for msg in messages(&buf[..n]) {
                if let Some(dest) = packet_dest(&msg) {
                    tally.add(dest);
                }
            }
        }
    }
}

/// The netlink messages in one read (each at a 4-byte boundary); parsing
/// stops at the first that does not parse.
fn messages(mut bytes: &[u8]) -> Vec<NetlinkMessage<NetfilterMessage>> {
    let mut out = Vec::new();
    while bytes.len() >= 16 {
        let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        if len < 16 || len > bytes.len() {
            break;
        }
        match NetlinkMessage::<NetfilterMessage>::deserialize(&bytes[..len]) {
            Ok(m) => out.push(m),
            Err(e) => {
                debug!("drops: a message that does not parse: {e}");
                break;
            }
        }
        bytes = &bytes[len.next_multiple_of(4).min(bytes.len())..];
    }
    out
}

fn packet_dest(msg: &NetlinkMessage<NetfilterMessage>) -> Option<Dest> {
    let NetlinkPayload::InnerMessage(NetfilterMessage {
        inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
        ..
    }) = &msg.payload
    else {
        return None;
    };
    nlas.iter().find_map(|nla| match nla {
        PacketNla::Payload(p) => parse_ip_packet(p),
        _ => None,
    })
}

/// The `net-drops` thread: until `stop`, reads the socket and tells the
/// host what was dropped, one batch per [`FLUSH_EVERY`].
pub fn serve(sock: &NflogSocket, host: &Host, stop: &StopSignal) {
    let mut buf = vec![0u8; RECV_BUF];
    let mut tally = Tally::default();
    let mut flush_at: Option<Instant> = None;
    loop {
        let mut fds = [
            fdio::pollfd(stop.fd(), fdio::IN),
            fdio::pollfd(sock.fd.as_fd(), fdio::IN),
        ];
        if let Err(e) = fdio::poll(&mut fds, flush_at) {
            warn!("drops: poll failed: {e}");
            return;
        }
        if fdio::ready(&fds[0]) {
            sock.receive(&mut buf, &mut tally);
            return last_flush(&mut tally, host);
        }
        if fdio::ready(&fds[1]) {
            sock.receive(&mut buf, &mut tally);
        }
        let now = Instant::now();
        if tally.is_empty() {
            flush_at = None;
        } else if flush_at.is_none() {
            flush_at = Some(now + FLUSH_EVERY);
        }
        if flush_at.is_some_and(|at| now >= at) {
            flush(&mut tally, host, stop, now + ASK_WAIT * MAX_DESTS as u32);
            flush_at = None;
        }
    }
}

/// At the stop: what is left, told within [`LAST_WAIT`], with a signal of
/// its own (the service's has fired).
fn last_flush(tally: &mut Tally, host: &Host) {
    if tally.is_empty() {
        return;
    }
    match StopSignal::new() {
        Ok(never) => flush(tally, host, &never, Instant::now() + LAST_WAIT),
        Err(e) => warn!("drops: the last batch is not told: {e}"),
    }
}

/// Asks the host about each destination in `tally`, until `deadline`.
fn flush(tally: &mut Tally, host: &Host, stop: &StopSignal, deadline: Instant) {
    let (counts, lost) = tally.take();
    if lost > 0 {
        warn!("drops: {lost} dropped packet(s) not told to the host (over {MAX_DESTS} destinations, or the kernel's buffer was full)");
    }
    for (dest, count) in counts {
        let question = NetToHost::Dropped {
            token: host.token.clone(),
            proto: dest.proto.name(),
            ip: dest.ip.to_string(),
            port: dest.port,
            count,
        };
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(ASK_WAIT);
        if wait.is_zero() {
            warn!("drops: out of time to tell the host of the rest");
            return;
        }
        match host.ask(&question, stop.fd(), wait) {
            Ok((_, HostToNet::Verdict { reason, .. })) => {
                debug!("drops: {count} to {}: {reason}", dest.ip);
            }
            Ok((_, other)) => warn!("drops: the host answered {other:?}"),
            Err(e) => {
                warn!("drops: cannot tell the host: {}", crate::session::chain(&e));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(proto: u8, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = proto;
        p[12..16].copy_from_slice(&[10, 0, 2, 15]);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn ipv4_udp_icmp_and_other_protocols() {
        let d = parse_ip_packet(&v4(17, [192, 0, 2, 1], 9)).unwrap();
        assert_eq!(
            d,
            Dest {
                proto: Proto::Udp,
                ip: "192.0.2.1".parse().unwrap(),
                port: Some(9)
            }
        );
        let d = parse_ip_packet(&v4(1, [192, 0, 2, 1], 9)).unwrap();
        assert_eq!((d.proto, d.port), (Proto::Icmp, None));
        let d = parse_ip_packet(&v4(47, [192, 0, 2, 1], 9)).unwrap();
        assert_eq!(d.proto.name(), "ip-47");
        // Options: the ports come after the longer header.
        let mut opts = v4(17, [192, 0, 2, 1], 0);
        opts[0] = 0x46;
        opts.splice(20..20, [0u8; 4]);
        assert_eq!(parse_ip_packet(&opts).unwrap().port, Some(0));
        // Cut before the ports: the address, no port.
        let cut = &v4(17, [192, 0, 2, 1], 9)[..20];
        assert_eq!(parse_ip_packet(cut).unwrap().port, None);
    }

    #[test]
    fn ipv6_udp() {
        let mut p = vec![0u8; 48];
        p[0] = 0x60;
        p[6] = 17;
        let dst: Ipv6Addr = "2001:db8::1".parse().unwrap();
        p[24..40].copy_from_slice(&dst.octets());
        p[42..44].copy_from_slice(&443u16.to_be_bytes());
        let d = parse_ip_packet(&p).unwrap();
        assert_eq!(
            (d.proto, d.ip, d.port),
            (Proto::Udp, IpAddr::V6(dst), Some(443))
        );
    }

    #[test]
    fn short_or_garbage_is_nothing() {
        for bad in [&[][..], &[0x45; 19], &[0x60; 39], &[0x15; 60], &[0x41; 40]] {
            assert_eq!(parse_ip_packet(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_tally_is_bounded_and_empties() {
        let mut t = Tally::default();
        assert!(t.is_empty());
        let dest = |i: u16| Dest {
            proto: Proto::Udp,
            ip: "192.0.2.1".parse().unwrap(),
            port: Some(i),
        };
        for i in 0..(MAX_DESTS as u16 + 10) {
            t.add(dest(i));
        }
        t.add(dest(0));
        t.lost(2);
        let (counts, lost) = t.take();
        assert_eq!(counts.len(), MAX_DESTS);
        assert_eq!(counts[0], (dest(0), 2));
        assert_eq!(lost, 12);
        assert!(t.is_empty());
        assert_eq!(t.take(), (Vec::new(), 0));
    }

    #[test]
    fn netlink_messages_parse_to_packet_destinations() {
        // One nfnetlink_log packet message as the kernel writes it: the
        // netlink header, nfgenmsg, then NFULA_PAYLOAD (type 9).
        let payload = v4(17, [192, 0, 2, 1], 9);
        let nla_len = 4 + payload.len();
        let mut m = Vec::new();
        let total = 16 + 4 + nla_len.next_multiple_of(4);
        m.extend_from_slice(&(total as u32).to_ne_bytes());
        m.extend_from_slice(&0x0400u16.to_ne_bytes()); // ULOG << 8 | PACKET
        m.extend_from_slice(&[0; 2 + 4 + 4]);
        m.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
        m.extend_from_slice(&(nla_len as u16).to_ne_bytes());
        m.extend_from_slice(&9u16.to_ne_bytes());
        m.extend_from_slice(&payload);
        m.resize(total, 0);
        let two = [m.clone(), m].concat();
        let msgs = messages(&two);
        assert_eq!(msgs.len(), 2);
        let d = packet_dest(&msgs[1]).unwrap();
        assert_eq!((d.proto, d.port), (Proto::Udp, Some(9)));
        // A cut message ends the parse, without a panic.
        assert_eq!(messages(&two[..total + 10]).len(), 1);
    }
}
