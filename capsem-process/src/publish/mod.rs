//! Published ports (`--publish IP:HOST_PORT:GUEST_PORT`, the CLI's `-p`):
//! a TCP listener on the host per port, each connection relayed to the
//! guest's 127.0.0.1:GUEST_PORT.
//!
//! * [`bind_all`] binds every listener in [`crate::session::Session::new`],
//!   before the guest starts, so a port in use is capsem-process's startup
//!   error (the ready line's `error:`), not a VM that is ready without it.
//! * [`accept_publish`] serves one listener with the shared accept loop
//!   (at most [`MAX_CONNS`] connections at once; more are closed). Each
//!   connection ([`conn`]) opens its own vsock connection to the agent's
//!   publish port through vhost-device-vsock's Unix socket (the
//!   hybrid-vsock `CONNECT`), sends `Open{token, port}`, waits for
//!   `Opened` within [`OPEN_WAIT`], and relays with a bounded buffer per
//!   direction ([`RELAY_BUF`]) until the guest's side ends, the client's
//!   side ended and nothing came back for [`IDLE_AFTER_EOF`], or the VM
//!   stops. A refused dial or a guest that does not answer closes the
//!   client's connection with a reset.
//! * The session stops and joins these loops first in its teardown, so a
//!   published port stops answering as soon as the VM begins to stop.
//!
//! Files: [`conn`] one connection.

mod conn;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use capsem_host::publish::Publish;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::accept::{self, Limits};

/// How long the guest may take to accept and answer `Open` (the agent's
/// own dial is bounded at 5 s).
pub const OPEN_WAIT: Duration = Duration::from_secs(10);
/// Each direction's relay buffer.
pub const RELAY_BUF: usize = 16 * 1024;
/// Once the client's side ended, the relay ends after this long without a
/// byte from the guest: vhost-device-vsock turns a host-side half-close
/// into a full shutdown, so the client's EOF is not passed on, and a
/// guest server waiting for it would otherwise hold both ends.
pub const IDLE_AFTER_EOF: Duration = Duration::from_secs(10);
/// Connections served at once per published port; more are closed.
pub const MAX_CONNS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("-p {spec}: cannot listen on {addr}")]
    Bind {
        spec: String,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What every connection task needs.
#[derive(Debug)]
pub struct PublishCtx {
    pub token: String,
    /// vhost-device-vsock's `--uds-path`, where host connections begin.
    pub uds: PathBuf,
}

/// Binds every published port, in order; the first failure is the error.
pub fn bind_all(ports: &[Publish]) -> Result<Vec<(Publish, TcpListener)>, PublishError> {
    ports
        .iter()
        .map(|p| {
            let addr = p.host_addr();
            let err = |source| PublishError::Bind {
                spec: p.to_arg(),
                addr,
                source,
            };
            let std = std::net::TcpListener::bind(addr).map_err(err)?;
            std.set_nonblocking(true).map_err(err)?;
            let listener = TcpListener::from_std(std).map_err(err)?;
            info!(
                "publish: listening on {addr} for guest port {}",
                p.guest_port
            );
            Ok((*p, listener))
        })
        .collect()
}

/// Serves one published port until `stop`; every connection is joined.
pub async fn accept_publish(
    listener: TcpListener,
    port: Publish,
    ctx: Arc<PublishCtx>,
    stop: watch::Receiver<bool>,
) {
    let limits = Limits {
        name: "publish",
        max_conns: MAX_CONNS,
    };
    let conn_stop = stop.clone();
    accept::serve(listener, limits, stop, move |client| {
        let (ctx, stop) = (ctx.clone(), conn_stop.clone());
        async move { conn::serve(client, port, &ctx, stop).await }
    })
    .await;
}
