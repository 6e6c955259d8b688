//! The control connection's threads: `ctl_rx` (Ping → Pong, Resize,
//! Shutdown), `ctl_tx` (its only writer), and `heartbeat` (declares the host
//! gone when it has been silent too long, and turns a termination signal
//! into an event).

use std::sync::atomic::Ordering;
use std::time::Duration;

use capsem_proto::conn::{FrameReader, FrameWriter};
use capsem_proto::frame::Guest;
use capsem_proto::guest::{GuestToHost, HostToGuest};
use capsem_proto::Codec;
use crossbeam_channel::{select, Receiver, Sender};
use tracing::warn;

use super::terminal::conn_failed;
use super::{Cx, Event};
use crate::fdio::{self, Blocking};

/// Control frames from the host. `codec` holds bytes that followed the ack.
pub(super) fn ctl_rx(cx: &Cx<'_>, codec: Codec<Guest>, out: &Sender<GuestToHost>) -> Event {
    let mut frames = FrameReader::with_codec(Blocking::new(cx.control, cx.stop.fd()), codec);
    loop {
        let msg = match frames.read_frame() {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Event::TransportLost("control connection closed by the host".into())
            }
            Err(e) => return conn_failed("control read failed", &e),
        };
        let ms = u64::try_from(cx.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        cx.last_rx_ms.store(ms, Ordering::SeqCst);
        match msg {
            HostToGuest::Ping { seq } => {
                select! {
                    send(out, GuestToHost::Pong { seq }) -> r => if r.is_err() { return Event::Stopped },
                    recv(cx.stop.receiver()) -> _ => return Event::Stopped,
                }
            }
            HostToGuest::Resize { cols, rows } => {
                if let Err(e) = cx.shell.resize(cols, rows) {
                    warn!(error = %e, "resize failed");
                }
            }
            HostToGuest::Shutdown => return Event::ShutdownRequested,
            HostToGuest::HelloAck { .. } => warn!("ignoring a second HelloAck"),
        }
    }
}

/// The only writer of the control socket.
pub(super) fn ctl_tx(cx: &Cx<'_>, rx: &Receiver<GuestToHost>) -> Event {
    let mut frames = FrameWriter::<Guest, _>::new(Blocking::new(cx.control, cx.stop.fd()));
    loop {
        let msg = select! {
            recv(rx) -> m => match m {
                Ok(m) => m,
                Err(_) => return Event::Stopped,
            },
            recv(cx.stop.receiver()) -> _ => return Event::Stopped,
        };
        if let Err(e) = frames.write_frame(&msg) {
            if matches!(e, capsem_proto::conn::ConnError::Frame(_)) {
                warn!(error = %e, kind = msg.kind(), "cannot encode a control message; dropped");
                continue;
            }
            return conn_failed("control write failed", &e);
        }
    }
}

/// Declares the host gone after `host_timeout` without a control message, and
/// turns a pending termination signal into an event.
pub(super) fn heartbeat(cx: &Cx<'_>) -> Event {
    let timeout = cx.opts.host_timeout;
    loop {
        let last = cx.epoch + Duration::from_millis(cx.last_rx_ms.load(Ordering::SeqCst));
        let silent = last.elapsed();
        if silent >= timeout {
            return Event::TransportLost(format!(
                "host silent for {} ms (limit {} ms)",
                silent.as_millis(),
                timeout.as_millis()
            ));
        }
        let mut fds = [
            fdio::pollfd(cx.stop.fd(), fdio::IN),
            fdio::pollfd(cx.signals, fdio::IN),
        ];
        // Wakes at the moment the host would be overdue, then re-checks.
        if let Err(e) = fdio::poll(&mut fds, Some(last + timeout)) {
            return Event::TransportLost(format!("heartbeat poll failed: {e}"));
        }
        if fdio::ready(&fds[0]) {
            return Event::Stopped;
        }
        if fdio::ready(&fds[1]) {
            return Event::Terminated;
        }
    }
}
