//! The one accept loop every listener runs (the guest's Unix sockets and
//! the published ports' TCP listeners, each a [`Listener`]): a bounded
//! number of connections served at once (one task each, owned by a
//! `JoinSet`), a capped backoff after an accept error (EMFILE must not
//! spin), and a stop signal that ends the loop and joins every connection
//! task. The connections closed over the bound are one log line per
//! [`REJECTED_EVERY`] with their count (the first at once), not a line each.

use std::future::Future;
use std::io;
use std::time::Duration;

use capsem_net::rate::Summary;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::warn;

/// First wait after a failed accept; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one line this often about the connections closed over the bound.
pub const REJECTED_EVERY: Duration = Duration::from_secs(5);

/// A listener's name (for logs) and how many connections it serves at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub name: &'static str,
    pub max_conns: usize,
}

/// What [`serve`] accepts on.
pub trait Listener: Send + 'static {
    type Stream: Send + 'static;
    /// The next connection.
    fn next(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send + '_;
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    async fn next(&self) -> io::Result<UnixStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    async fn next(&self) -> io::Result<TcpStream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// The stop side of [`serve`]'s signal: `stop()` ends every loop that was
/// given a [`Stop::subscribe`]d receiver.
#[derive(Debug)]
pub struct Stop(watch::Sender<bool>);

impl Default for Stop {
    fn default() -> Self {
        Self(watch::channel(false).0)
    }
}

impl Stop {
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }

    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}

/// Waits until `stop` says so (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Accepts on `listener` until `stop`, handing each connection to
/// `handle`; a connection over `limits.max_conns` is closed with one log
/// line. Returns once every connection task has been stopped and joined.
pub async fn serve<L, F, Fut>(
    listener: L,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    mut handle: F,
) where
    L: Listener,
    F: FnMut(L::Stream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    let mut backoff = BACKOFF_MIN;
    let mut rejected = Summary::new(REJECTED_EVERY);
    loop {
        let report_at = rejected
            .deadline(std::time::Instant::now())
            .map(tokio::time::Instant::from_std);
        tokio::select! {
            () = stopped(&mut stop) => break,
            () = sleep_until(report_at), if report_at.is_some() => {
                report_rejected(&mut rejected, limits, std::time::Instant::now());
            }
            accepted = listener.next() => match accepted {
                Ok(stream) => {
                    backoff = BACKOFF_MIN;
                    if conns.len() >= limits.max_conns {
                        drop(stream);
                        rejected.add(1);
                        report_rejected(&mut rejected, limits, std::time::Instant::now());
                        continue;
                    }
                    conns.spawn(handle(stream));
                }
                Err(e) => {
                    warn!("{}: accept failed: {e}; retrying in {backoff:?}", limits.name);
                    tokio::select! {
                        () = stopped(&mut stop) => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            },
            Some(joined) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = joined {
                    warn!("{}: a connection task failed: {e}", limits.name);
                }
            }
        }
    }
    conns.shutdown().await;
    report_rejected(
        &mut rejected,
        limits,
        std::time::Instant::now() + REJECTED_EVERY,
    );
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Logs the rejections counted, if a line is due.
fn report_rejected(rejected: &mut Summary, limits: Limits, now: std::time::Instant) {
    if let Some(n) = rejected.due(now) {
        warn!(
            "{} connection rejected: {} already in progress ({n} closed since the last such line)",
            limits.name, limits.max_conns
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn bounded_then_stopped_and_joined() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let stop = Stop::default();
        let served = Arc::new(AtomicUsize::new(0));
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<()>(8);
        let counter = served.clone();
        let task = tokio::spawn(serve(
            listener,
            Limits {
                name: "test",
                max_conns: 2,
            },
            stop.subscribe(),
            move |stream| {
                let counter = counter.clone();
                let seen = seen_tx.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _ = seen.send(()).await;
                    // Held until the stop joins this task.
                    std::future::pending::<()>().await;
                    drop(stream);
                }
            },
        ));
        let mut clients = Vec::new();
        for _ in 0..2 {
            clients.push(UnixStream::connect(&path).await.unwrap());
            seen_rx.recv().await.unwrap();
        }
        // The third is over the bound: closed without a task.
        let mut third = UnixStream::connect(&path).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut third, &mut buf)
            .await
            .unwrap();
        assert_eq!(n, 0, "the connection over the bound is closed");
        stop.stop();
        task.await.unwrap();
        assert_eq!(served.load(Ordering::SeqCst), 2);
        // The tasks were joined: their streams are closed.
        for mut c in clients {
            let n = tokio::io::AsyncReadExt::read(&mut c, &mut buf)
                .await
                .unwrap();
            assert_eq!(n, 0);
        }
    }
}
