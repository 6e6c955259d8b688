//! The guest's side of the network (`$CAPSEM_NET=1`, set by capsem-init
//! when the kernel command line has `capsem.net=1`, which the host adds for
//! a policy other than `--net none`). capsem-init has brought up `lo`, a
//! dummy interface with the default route, and nftables rules that send
//! every TCP connection not to loopback to [`PROXY_ADDR`] and every DNS
//! query to [`DNS_ADDR`], and drop all other egress. Here:
//!
//! * [`dns`]: the resolver on [`DNS_ADDR`] (synthetic addresses for the
//!   names the host allows, NXDOMAIN for the others);
//! * [`gate`]: the resolver's bounds on its questions to the host (the
//!   refused names remembered, a rate, one log line per interval);
//! * [`proxy`]: the TCP side on [`PROXY_ADDR`] (original destination, SNI
//!   or Host, the host's verdict, the relay);
//! * [`peek`]: SNI and Host from a connection's first bytes;
//! * [`ask`]: the questions to the host on the network port;
//! * [`drops`]: the packets the firewall dropped (read from
//!   nfnetlink_log), told to the host for its records.
//!
//! The decision is the host's: the agent asks per name (`Resolve`) and per
//! connection (`Connect`) and holds no policy, so a compromised guest can
//! learn nothing it could bypass. [`NetService`] owns its three threads;
//! its drop stops and joins them (and every connection thread).

mod ask;
pub mod dns;
pub mod drops;
pub mod gate;
mod peek;
pub mod proxy;

use std::net::{TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tracing::{info, warn};

pub use self::ask::Host;
use crate::stop::StopSignal;
use crate::transport::Transport;

/// The resolver's address (`/etc/resolv.conf` names it).
pub const DNS_ADDR: &str = "127.0.0.1:53";
/// Where nftables redirects the guest's TCP connections.
pub const PROXY_ADDR: &str = "127.0.0.1:849";
/// `$CAPSEM_NET`: `1` turns the service on.
pub const ENV: &str = "CAPSEM_NET";

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot bind {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the stop signal")]
    Stop(#[source] crate::stop::StopError),
    #[error("cannot start the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
}

/// The resolver and the TCP side, running.
#[derive(Debug)]
pub struct NetService {
    stop: Arc<StopSignal>,
    threads: Vec<JoinHandle<()>>,
}

impl NetService {
    /// Starts the service when `$CAPSEM_NET` is `1`; a failure is logged and
    /// the guest stays without a network (nftables still drops everything).
    pub fn from_env(transport: &Transport, token: &str) -> Option<Self> {
        if std::env::var(ENV).ok().as_deref() != Some("1") {
            return None;
        }
        let host = Host {
            transport: transport.clone(),
            token: token.to_owned(),
        };
        // Without the log the network still works; only the drops' records
        // are missing.
        let drops = drops::NflogSocket::open()
            .inspect_err(|e| {
                warn!(
                    "network: no records of dropped packets: {}",
                    crate::session::chain(e)
                )
            })
            .ok();
        match Self::start(host, DNS_ADDR, PROXY_ADDR, drops) {
            Ok(s) => {
                info!("network: resolver on {DNS_ADDR}, connections on {PROXY_ADDR}");
                Some(s)
            }
            Err(e) => {
                warn!("network unavailable: {}", crate::session::chain(&e));
                None
            }
        }
    }

    pub fn start(
        host: Host,
        dns_addr: &str,
        proxy_addr: &str,
        drops: Option<drops::NflogSocket>,
    ) -> Result<Self, NetError> {
        let bind_err = |addr: &str| {
            let addr = addr.to_owned();
            move |source| NetError::Bind { addr, source }
        };
        let udp = UdpSocket::bind(dns_addr).map_err(bind_err(dns_addr))?;
        udp.set_nonblocking(true).map_err(bind_err(dns_addr))?;
        let tcp = TcpListener::bind(proxy_addr).map_err(bind_err(proxy_addr))?;
        tcp.set_nonblocking(true).map_err(bind_err(proxy_addr))?;
        let stop = Arc::new(StopSignal::new().map_err(NetError::Stop)?);
        let table = Arc::new(Mutex::new(dns::Table::new(dns::MAX_NAMES)));
        let mut service = Self {
            stop: stop.clone(),
            threads: Vec::new(),
        };
        let (t, h, s) = (table.clone(), host.clone(), stop.clone());
        let dns = std::thread::Builder::new()
            .name("net-dns".into())
            .spawn(move || dns::serve(&udp, &t, &h, &s))
            .map_err(|e| NetError::Thread("net-dns", e))?;
        service.threads.push(dns);
        if let Some(sock) = drops {
            let (h, s) = (host.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name("net-drops".into())
                .spawn(move || drops::serve(&sock, &h, &s))
                .map_err(|e| NetError::Thread("net-drops", e))?;
            service.threads.push(t);
        }
        let proxy = std::thread::Builder::new()
            .name("net-proxy".into())
            .spawn(move || proxy::serve(&tcp, &table, &host, &stop))
            .map_err(|e| NetError::Thread("net-proxy", e))?;
        service.threads.push(proxy);
        Ok(service)
    }
}

impl Drop for NetService {
    fn drop(&mut self) {
        self.stop.trigger();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
