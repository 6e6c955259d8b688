//! The guest's resolver: a DNS stub on `127.0.0.1:53` (UDP; nftables sends
//! every guest DNS query there). It never forwards a query anywhere:
//!
//! * a name the host says the policy may resolve (`Resolve`, asked once per
//!   name) gets an `A` answer with a synthetic address from
//!   [`SYNTHETIC`] (198.18.0.0/15), remembered in the [`Table`] so that the
//!   TCP side maps the address back to the name; other types (`AAAA`...)
//!   get an empty answer, so clients use IPv4;
//! * a name the host refuses is NXDOMAIN at once, and remembered (so a
//!   repeat is NXDOMAIN without asking);
//! * over the rate of questions to the host: REFUSED at once;
//! * the host unreachable: SERVFAIL.
//!
//! The names not yet seen pass the [`Gate`] (the refused names, the rate,
//! the once-per-interval log lines) before anything is asked. Queries are
//! served one at a time from the socket's own bounded receive buffer
//! (the kernel drops what does not fit), so a flood costs no memory here.
//!
//! Messages are parsed and written with `simple-dns`; a query over
//! [`MAX_QUERY`] bytes or one that does not parse is dropped.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsem_proto::net::{HostToNet, NetToHost};
use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, PacketFlag, ResourceRecord, CLASS, QTYPE, RCODE, TYPE};
use tracing::{debug, warn};

use super::ask::Host;
use super::gate::Gate;
use crate::fdio;
use crate::stop::StopSignal;

/// Where synthetic addresses come from (the benchmarking range: never a
/// real destination, and denied by the host unless a rule names it).
pub const SYNTHETIC: (Ipv4Addr, u32) = (Ipv4Addr::new(198, 18, 0, 0), 15);
/// Names remembered at once; the oldest is forgotten first.
pub const MAX_NAMES: usize = 16_384;
/// The largest query read (UDP DNS without EDNS is 512 bytes).
pub const MAX_QUERY: usize = 1500;
/// The answers' TTL: short, so a forgotten address is not cached long.
const TTL: u32 = 30;
/// How long the host may take to answer a `Resolve`.
const ASK_WAIT: Duration = Duration::from_secs(5);

/// Name <-> synthetic address, bounded ([`MAX_NAMES`], oldest out first).
#[derive(Debug, Default)]
pub struct Table {
    by_name: HashMap<String, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, String>,
    order: VecDeque<Ipv4Addr>,
    next: u32,
    cap: usize,
}

impl Table {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.clamp(1, MAX_NAMES),
            ..Self::default()
        }
    }

    /// The address for `name` (lowercase), assigning the next free one.
    pub fn insert(&mut self, name: &str) -> Ipv4Addr {
        if let Some(ip) = self.by_name.get(name) {
            return *ip;
        }
        if self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                if let Some(n) = self.by_ip.remove(&old) {
                    self.by_name.remove(&n);
                }
            }
        }
        let size = 1u32 << (32 - SYNTHETIC.1);
        let ip = loop {
            // Offsets 1 .. size-2: skip the network and broadcast addresses.
            self.next = self.next % (size - 2) + 1;
            let ip = Ipv4Addr::from(u32::from(SYNTHETIC.0) + self.next);
            if !self.by_ip.contains_key(&ip) {
                break ip;
            }
        };
        self.by_name.insert(name.to_owned(), ip);
        self.by_ip.insert(ip, name.to_owned());
        self.order.push_back(ip);
        ip
    }

    pub fn name_of(&self, ip: Ipv4Addr) -> Option<&str> {
        self.by_ip.get(&ip).map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }
}

/// Whether the policy lets a name resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    Denied,
    /// Over the rate of questions to the host: REFUSED.
    Throttled,
    Unknown,
}

/// The reply to `query`, deciding unknown names with `decide`; `None` for
/// a query to drop.
pub fn reply(
    query: &[u8],
    table: &Mutex<Table>,
    decide: &mut dyn FnMut(&str) -> Decision,
) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    let question = q.questions.first()?.clone();
    let name = question
        .qname
        .to_string()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let known = lock(table).contains(&name);
    let decision = if known {
        Decision::Allowed
    } else {
        decide(&name)
    };
    let mut r = Packet::new_reply(q.id());
    if q.has_flags(PacketFlag::RECURSION_DESIRED) {
        r.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    r.set_flags(PacketFlag::RECURSION_AVAILABLE);
    r.questions.push(question.clone());
    match decision {
        Decision::Denied => *r.rcode_mut() = RCODE::NameError,
        Decision::Throttled => *r.rcode_mut() = RCODE::Refused,
        Decision::Unknown => *r.rcode_mut() = RCODE::ServerFailure,
        Decision::Allowed => {
            let ip = lock(table).insert(&name);
            if question.qtype == QTYPE::TYPE(TYPE::A) {
                r.answers.push(ResourceRecord::new(
                    question.qname.clone(),
                    CLASS::IN,
                    TTL,
                    RData::A(A::from(ip)),
                ));
            }
        }
    }
    r.build_bytes_vec().ok()
}

fn lock(table: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves `socket` until `stop`, one query at a time (a flood waits its
/// turn in the socket's buffer; memory stays flat).
pub fn serve(socket: &UdpSocket, table: &Arc<Mutex<Table>>, host: &Host, stop: &StopSignal) {
    let mut buf = vec![0u8; MAX_QUERY];
    let mut gate = Gate::new(Instant::now());
    loop {
        let now = Instant::now();
        gate.report(now);
        let mut fds = [
            fdio::pollfd(stop.fd(), fdio::IN),
            fdio::pollfd(socket.as_fd(), fdio::IN),
        ];
        if let Err(e) = fdio::poll(&mut fds, gate.deadline(now)) {
            warn!("dns: poll failed: {e}");
            return;
        }
        if fdio::ready(&fds[0]) {
            return;
        }
        let (n, peer) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!("dns: receive failed: {e}");
                continue;
            }
        };
        let mut decide =
            |name: &str| gate.decide(name, Instant::now(), &mut |n: &str| ask(host, n, stop));
        if let Some(bytes) = reply(&buf[..n], table, &mut decide) {
            if let Err(e) = socket.send_to(&bytes, peer) {
                debug!("dns: cannot answer {peer}: {e}");
            }
        }
    }
}

/// The host's answer: whether `name` may resolve, or why there is none.
fn ask(host: &Host, name: &str, stop: &StopSignal) -> Result<bool, String> {
    let question = NetToHost::Resolve {
        token: host.token.clone(),
        name: name.to_owned(),
    };
    match host.ask(&question, stop.fd(), ASK_WAIT) {
        Ok((_, HostToNet::Resolved { allowed })) => Ok(allowed),
        Ok((_, other)) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(format!(
            "cannot ask about {name}: {}",
            crate::session::chain(&e)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::{Name, Question};

    fn query(name: &str, qtype: TYPE) -> Vec<u8> {
        let mut p = Packet::new_query(7);
        p.set_flags(PacketFlag::RECURSION_DESIRED);
        p.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(qtype),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        p.build_bytes_vec().unwrap()
    }

    #[test]
    fn allowed_names_get_stable_synthetic_addresses() {
        let table = Mutex::new(Table::new(8));
        let mut asked = Vec::new();
        let mut decide = |n: &str| {
            asked.push(n.to_owned());
            if n == "a.example" {
                Decision::Allowed
            } else {
                Decision::Denied
            }
        };
        let r = reply(&query("A.Example", TYPE::A), &table, &mut decide).unwrap();
        let p = Packet::parse(&r).unwrap();
        assert_eq!(p.id(), 7);
        assert_eq!(p.rcode(), RCODE::NoError);
        let RData::A(a) = &p.answers[0].rdata else {
            panic!("not an A record")
        };
        let ip = Ipv4Addr::from(a.address);
        assert_eq!(ip, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(table.lock().unwrap().name_of(ip), Some("a.example"));
        // AAAA: known name, empty answer, no second question to the host.
        let r = reply(&query("a.example", TYPE::AAAA), &table, &mut decide).unwrap();
        let p = Packet::parse(&r).unwrap();
        assert_eq!(p.rcode(), RCODE::NoError);
        assert!(p.answers.is_empty());
        let r = reply(&query("b.example", TYPE::A), &table, &mut decide).unwrap();
        assert_eq!(Packet::parse(&r).unwrap().rcode(), RCODE::NameError);
        assert_eq!(asked, ["a.example", "b.example"]);
        let r = reply(&query("c.example", TYPE::A), &table, &mut |_| {
            Decision::Unknown
        });
        assert_eq!(
            Packet::parse(&r.unwrap()).unwrap().rcode(),
            RCODE::ServerFailure
        );
        let r = reply(&query("d.example", TYPE::A), &table, &mut |_| {
            Decision::Throttled
        });
        let r = r.unwrap();
        let p = Packet::parse(&r).unwrap();
        assert_eq!(p.rcode(), RCODE::Refused);
        assert!(p.answers.is_empty());
        assert!(!table.lock().unwrap().contains("d.example"));
    }

    #[test]
    fn garbage_is_dropped() {
        let table = Mutex::new(Table::new(8));
        let mut decide = |_: &str| Decision::Allowed;
        assert!(reply(b"\x00\x01\x02", &table, &mut decide).is_none());
        assert!(reply(&[0xff; 600], &table, &mut decide).is_none());
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_oldest() {
        let mut t = Table::new(2);
        let a = t.insert("a");
        let b = t.insert("b");
        assert_eq!(t.insert("a"), a);
        let c = t.insert("c");
        assert!(!t.contains("a") && t.contains("b") && t.contains("c"));
        assert_eq!(t.name_of(a), None);
        assert_ne!(c, b);
        assert_eq!(t.name_of(c), Some("c"));
    }
}
