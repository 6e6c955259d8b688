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
//! the once-per-interval log lines); an admitted one waits in a bounded
//! queue ([`ASK_QUEUE`]) for one of [`ASKERS`] threads, which asks the
//! host and answers, so a slow host answer never holds up the answers
//! that need none (known names, refusals, throttling). Queries are read
//! one at a time from the socket's own bounded receive buffer (the kernel
//! drops what does not fit), so a flood costs no memory here.
//!
//! Messages are parsed and written with `simple-dns`; a query over
//! [`MAX_QUERY`] bytes or one that does not parse is dropped.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsem_proto::net::{HostToNet, NetToHost};
use simple_dns::rdata::{RData, A};
use simple_dns::{Packet, PacketFlag, ResourceRecord, CLASS, QTYPE, RCODE, TYPE};
use tracing::{debug, warn};

use super::ask::Host;
use super::gate::{Admit, Gate, SUMMARY_EVERY};
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Threads asking the host about names, at once.
pub const ASKERS: usize = 4;
/// Admitted names waiting for an asker; a name beyond them is REFUSED.
pub const ASK_QUEUE: usize = 64;

/// A query waiting for the host's answer about its name.
#[derive(Debug)]
struct Job {
    query: Vec<u8>,
    peer: SocketAddr,
    name: String,
}

/// What the resolver's threads share.
struct Ctx<'a> {
    socket: &'a UdpSocket,
    table: &'a Mutex<Table>,
    gate: &'a Mutex<Gate>,
    host: &'a Host,
    stop: &'a StopSignal,
}

/// The name a query asks about (lowercase, no final dot); `None` for one
/// to drop.
fn question_name(query: &[u8]) -> Option<String> {
    let q = Packet::parse(query).ok()?;
    let name = q.questions.first()?.qname.to_string();
    Some(name.trim_end_matches('.').to_ascii_lowercase())
}

fn send(socket: &UdpSocket, bytes: Option<Vec<u8>>, peer: SocketAddr) {
    if let Some(bytes) = bytes {
        if let Err(e) = socket.send_to(&bytes, peer) {
            debug!("dns: cannot answer {peer}: {e}");
        }
    }
}

/// Serves `socket` until `stop`; the askers are joined before it returns.
pub fn serve(socket: &UdpSocket, table: &Arc<Mutex<Table>>, host: &Host, stop: &StopSignal) {
    let gate = Mutex::new(Gate::new(Instant::now()));
    let ctx = Ctx {
        socket,
        table,
        gate: &gate,
        host,
        stop,
    };
    std::thread::scope(|s| {
        let (jobs, queue) = crossbeam_channel::bounded::<Job>(ASK_QUEUE);
        for _ in 0..ASKERS {
            let (queue, ctx) = (queue.clone(), &ctx);
            let spawned = std::thread::Builder::new()
                .name("net-dns-ask".into())
                .spawn_scoped(s, move || {
                    // Ends when the sender is gone (the loop below ended).
                    for job in queue.iter() {
                        answer_job(ctx, job);
                    }
                });
            if let Err(e) = spawned {
                warn!("dns: cannot start an asker: {e}");
            }
        }
        drop(queue);
        receive(&ctx, &jobs);
        // `jobs` dropped here: the askers finish what is queued (each
        // question sees the stop) and are joined by the scope.
    });
}

/// The receiving loop: answers what needs no question, queues the rest.
fn receive(ctx: &Ctx<'_>, jobs: &crossbeam_channel::Sender<Job>) {
    let mut buf = vec![0u8; MAX_QUERY];
    loop {
        let now = Instant::now();
        let deadline = {
            let mut g = lock(ctx.gate);
            g.report(now);
            // The askers count failures too: look again within the interval.
            Some(g.deadline(now).unwrap_or(now + SUMMARY_EVERY))
        };
        let mut fds = [
            fdio::pollfd(ctx.stop.fd(), fdio::IN),
            fdio::pollfd(ctx.socket.as_fd(), fdio::IN),
        ];
        if let Err(e) = fdio::poll(&mut fds, deadline) {
            warn!("dns: poll failed: {e}");
            return;
        }
        if fdio::ready(&fds[0]) {
            return;
        }
        let (n, peer) = match ctx.socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!("dns: receive failed: {e}");
                continue;
            }
        };
        let query = &buf[..n];
        let Some(name) = question_name(query) else {
            continue;
        };
        let decision = if lock(ctx.table).contains(&name) {
            Decision::Allowed
        } else {
            let admit = lock(ctx.gate).admit(&name, Instant::now());
            match admit {
                Admit::Denied => Decision::Denied,
                Admit::Throttled => Decision::Throttled,
                Admit::Ask => {
                    let job = Job {
                        query: query.to_vec(),
                        peer,
                        name,
                    };
                    match jobs.try_send(job) {
                        Ok(()) => continue,
                        Err(crossbeam_channel::TrySendError::Full(_)) => {
                            lock(ctx.gate).busy();
                            Decision::Throttled
                        }
                        Err(crossbeam_channel::TrySendError::Disconnected(_)) => Decision::Unknown,
                    }
                }
            }
        };
        send(ctx.socket, reply(query, ctx.table, &mut |_| decision), peer);
    }
}

/// An asker's work: the host's answer about the job's name, remembered,
/// and the job's reply.
fn answer_job(ctx: &Ctx<'_>, job: Job) {
    let answer = ask(ctx.host, &job.name, ctx.stop);
    let decision = lock(ctx.gate).answered(&job.name, answer);
    send(
        ctx.socket,
        reply(&job.query, ctx.table, &mut |_| decision),
        job.peer,
    );
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

    use crate::stop::StopSignal;

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

    /// A host on `base`'s network port that refuses every name; a name
    /// starting with `slow` is held until `release` is dropped.
    fn fake_host(
        base: &std::path::Path,
        release: crossbeam_channel::Receiver<()>,
        done: Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        use capsem_proto::frame::NetHost;
        use capsem_proto::Codec;
        use std::io::{Read, Write};
        let path = crate::transport::Transport::unix_path(base, capsem_proto::guest::PORT_NET);
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::Builder::new()
            .name("fake-host".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if done.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let mut conn = conn.unwrap();
                    let mut prefix = [0u8; 4];
                    if conn.read_exact(&mut prefix).is_err() {
                        continue;
                    }
                    let mut frame = prefix.to_vec();
                    frame.resize(4 + u32::from_be_bytes(prefix) as usize, 0);
                    conn.read_exact(&mut frame[4..]).unwrap();
                    let mut codec = Codec::<NetHost>::new();
                    codec.feed(&frame).unwrap();
                    let Some(NetToHost::Resolve { name, .. }) = codec.next_message().unwrap()
                    else {
                        panic!("not a Resolve")
                    };
                    if name.starts_with("slow") {
                        let _ = release.recv();
                    }
                    let answer = HostToNet::Resolved { allowed: false };
                    let _ = conn.write_all(&Codec::<NetHost>::encode(&answer).unwrap());
                }
            })
            .unwrap()
    }

    #[test]
    fn a_slow_host_holds_no_other_answer_and_the_waiting_questions_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("vsock.sock");
        let (release_tx, release) = crossbeam_channel::bounded::<()>(0);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let host_thread = fake_host(&base, release, done.clone());
        let host = Host {
            transport: crate::transport::Transport::Unix(base.clone()),
            token: "tok".into(),
        };
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let addr = socket.local_addr().unwrap();
        let table = Arc::new(Mutex::new(Table::new(64)));
        table.lock().unwrap().insert("known.test");
        let stop = Arc::new(StopSignal::new().unwrap());
        let (t, s) = (table.clone(), stop.clone());
        let server = std::thread::Builder::new()
            .name("dns-under-test".into())
            .spawn(move || serve(&socket, &t, &host, &s))
            .unwrap();

        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let queries = 100;
        for i in 0..queries {
            client
                .send_to(&query(&format!("slow{i}.test"), TYPE::A), addr)
                .unwrap();
        }
        client.send_to(&query("known.test", TYPE::A), addr).unwrap();
        // Answers come in order: once the known name's is here, every
        // query before it was answered or is waiting for the host.
        let mut buf = [0u8; 1500];
        let mut refused = 0;
        loop {
            let n = client.recv(&mut buf).unwrap();
            let p = Packet::parse(&buf[..n]).unwrap();
            let name = p.questions[0].qname.to_string();
            if name.starts_with("known") {
                assert_eq!(p.rcode(), RCODE::NoError);
                assert_eq!(p.answers.len(), 1, "answered while the host holds");
                break;
            }
            assert_eq!(p.rcode(), RCODE::Refused, "{name}");
            refused += 1;
        }
        // At most ASKERS asking and ASK_QUEUE waiting; the rest refused.
        let held = queries - refused;
        assert!(
            (ASK_QUEUE..=ASK_QUEUE + ASKERS).contains(&held),
            "{held} held, {refused} refused"
        );
        drop(release_tx);
        for _ in 0..held {
            let n = client.recv(&mut buf).unwrap();
            assert_eq!(Packet::parse(&buf[..n]).unwrap().rcode(), RCODE::NameError);
        }
        // A refusal is remembered: asked again, NXDOMAIN without the host.
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        client.send_to(&query("slow0.test", TYPE::A), addr).unwrap();
        let n = client.recv(&mut buf).unwrap();
        assert_eq!(Packet::parse(&buf[..n]).unwrap().rcode(), RCODE::NameError);
        stop.trigger();
        server.join().unwrap();
        // Wakes the fake host's accept; it sees `done` and ends.
        let _ = std::os::unix::net::UnixStream::connect(crate::transport::Transport::unix_path(
            &base,
            capsem_proto::guest::PORT_NET,
        ));
        host_thread.join().unwrap();
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
