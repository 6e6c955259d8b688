//! The network port (`vsock.sock_5007`): the guest's egress, decided here
//! with the VM's policy (`capsem_net`), never in the guest.
//!
//! Each connection carries one question (`capsem_proto::net`), read exactly
//! and bounded within [`HEADER_WAIT`], with the session token:
//!
//! * `Resolve{name}`: may the guest's resolver answer for it
//!   (`Policy::may_resolve`)? A refusal is a `resolve` record.
//! * `Connect{name, seen, ip, port}`: step 1 (`check_connection`: the rule,
//!   and a SNI/Host that must be the name); the name resolved on the host
//!   ([`hosts`] override first, then the system resolver through
//!   `lookup_host`, so `/etc/hosts` applies) or the address literal; step 2
//!   (`check_address`) for each address; the first allowed one dialled
//!   within [`DIAL_WAIT`]; the verdict; then the bytes relayed both ways
//!   through bounded buffers ([`RELAY_BUF`]) until either side closes or
//!   the VM stops. Every connect is one `connect` record with its bytes
//!   and duration.
//! * `Dropped{proto, ip, port, count}`: packets the guest's firewall
//!   dropped, told by the agent ([`dropped`]): one `packet` record, and a
//!   denying verdict.
//!
//! At most [`MAX_CONNS`] connections are served at once (the accept loop's
//! bound; one `process.log` line per interval for those it closes), at
//! most [`limit::RESOLVE_PER_SEC`] / [`limit::CONNECT_PER_SEC`] /
//! [`limit::DROPPED_PER_SEC`] questions a second are answered ([`limit`]), and at most [`MAX_LOOKUPS`] names
//! are being resolved by the system resolver at once; records go to
//! `net.jsonl` ([`log`]), a flood's as one summary record per interval.
//! A connection's accept and close are debug lines here (a flood would
//! otherwise be two `process.log` lines per question).
//!
//! Files: [`conn`] one connection; [`dropped`] the `packet` records;
//! [`limit`] the rates and the summaries;
//! [`hosts`] the test override; [`log`] `net.jsonl`.

mod conn;
mod dropped;
pub mod hosts;
pub mod limit;
pub mod log;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsem_net::Policy;
use tokio::net::UnixListener;
use tokio::sync::{watch, Semaphore};
use tracing::warn;

use crate::accept::{self, Limits};
use crate::conntrace::ConnTrace;

pub use self::hosts::Hosts;
pub use self::log::{NetLog, NetRecord};

/// How long a new connection may take to send its question.
pub const HEADER_WAIT: Duration = Duration::from_secs(5);
/// How long resolving a name on the host may take.
pub const RESOLVE_WAIT: Duration = Duration::from_secs(5);
/// How long dialling one address may take.
pub const DIAL_WAIT: Duration = Duration::from_secs(5);
/// Each direction's relay buffer.
pub const RELAY_BUF: usize = 16 * 1024;
/// Guest connections served at once; more are closed.
pub const MAX_CONNS: usize = 256;
/// Names being resolved by the system resolver at once (each holds a
/// blocking thread until the resolver returns, which a timeout here does
/// not shorten); a `Connect` over it is denied.
pub const MAX_LOOKUPS: usize = 32;
/// How often the due summaries are written.
const SUMMARY_TICK: Duration = Duration::from_secs(1);

/// What every connection task needs.
#[derive(Debug)]
pub struct NetCtx {
    pub token: String,
    pub policy: Policy,
    pub hosts: Hosts,
    pub log: Mutex<NetLog>,
    pub limiter: limit::Limiter,
    pub lookups: Arc<Semaphore>,
}

impl NetCtx {
    pub fn new(token: String, policy: Policy, hosts: Hosts, log: NetLog) -> Self {
        Self {
            token,
            policy,
            hosts,
            log: Mutex::new(log),
            limiter: limit::Limiter::from_env(Instant::now()),
            lookups: Arc::new(Semaphore::new(MAX_LOOKUPS)),
        }
    }

    /// Appends a record; a failure is logged, never fatal.
    pub fn record(&self, record: &NetRecord) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = log.append(record) {
            warn!("net: {}", crate::log::chain(&e));
        }
    }

    /// Writes what is due of the flood summaries: a `process.log` line
    /// each, and a `net.jsonl` record for each kind of refused question.
    pub fn report(&self, now: Instant) {
        let due = self.limiter.due(now);
        for (kind, n, rate) in due.throttled {
            let reason = format!(
                "rate limit: over {rate} {} questions a second",
                kind.as_str()
            );
            warn!(
                "net: {n} {} questions refused: {reason} (reported at most every {:?})",
                kind.as_str(),
                limit::SUMMARY_EVERY
            );
            self.record(&NetRecord::throttled(kind.as_str(), reason, n));
        }
        if let Some((n, last)) = due.failed {
            warn!("net: {n} connections failed; the last: {last}");
        }
    }
}

/// Serves the network port until `stop`; every connection task is joined.
pub async fn accept_net(listener: UnixListener, ctx: Arc<NetCtx>, stop: watch::Receiver<bool>) {
    let limits = Limits {
        name: "net",
        max_conns: MAX_CONNS,
    };
    let conn_stop = stop.clone();
    let conn_ctx = ctx.clone();
    let serve = accept::serve(listener, limits, stop, move |stream| {
        let (ctx, stop) = (conn_ctx.clone(), conn_stop.clone());
        async move {
            let _trace = ConnTrace::quiet("net");
            if let Err(e) = conn::serve(stream, &ctx, stop).await {
                tracing::debug!("net connection: {}", crate::log::chain(&e));
                ctx.limiter.failed(crate::log::chain(&e));
                ctx.report(Instant::now());
            }
        }
    });
    let summaries = async {
        let mut tick = tokio::time::interval(SUMMARY_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            ctx.report(Instant::now());
        }
    };
    tokio::select! {
        () = serve => {}
        () = summaries => {}
    }
    // What was still counted, as if its interval had passed.
    ctx.report(Instant::now() + limit::SUMMARY_EVERY);
}
