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
//!
//! At most [`MAX_CONNS`] connections are served at once (the accept loop's
//! bound); records go to `net.jsonl` ([`log`]).
//!
//! Files: [`conn`] one connection; [`hosts`] the test override;
//! [`log`] `net.jsonl`.

mod conn;
pub mod hosts;
pub mod log;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsem_net::Policy;
use tokio::net::UnixListener;
use tokio::sync::watch;
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

/// What every connection task needs.
#[derive(Debug)]
pub struct NetCtx {
    pub token: String,
    pub policy: Policy,
    pub hosts: Hosts,
    pub log: Mutex<NetLog>,
}

impl NetCtx {
    /// Appends a record; a failure is logged, never fatal.
    pub fn record(&self, record: &NetRecord) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = log.append(record) {
            warn!("net: {}", crate::log::chain(&e));
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
    accept::serve(listener, limits, stop, move |stream| {
        let (ctx, stop) = (ctx.clone(), conn_stop.clone());
        async move {
            let _trace = ConnTrace::accepted("net");
            if let Err(e) = conn::serve(stream, &ctx, stop).await {
                warn!("net connection: {}", crate::log::chain(&e));
            }
        }
    })
    .await;
}
