//! One log line when a guest connection is accepted and one when our end of
//! it is dropped, each with the same id, so a session's log shows that every
//! accepted vsock connection was closed (the original capsem logged 3652
//! accepts and no close). A port with a connection per question (the
//! network port) traces [`ConnTrace::quiet`]ly: debug lines, so that a
//! flood of questions is not two `process.log` lines each.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, info};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Travels with a guest connection; its drop is the close.
#[derive(Debug)]
pub struct ConnTrace {
    port: &'static str,
    id: u64,
    quiet: bool,
}

impl ConnTrace {
    pub fn accepted(port: &'static str) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        info!("vsock connection accepted port={port} id={id}");
        Self {
            port,
            id,
            quiet: false,
        }
    }

    /// The same lines at debug level.
    pub fn quiet(port: &'static str) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        debug!("vsock connection accepted port={port} id={id}");
        Self {
            port,
            id,
            quiet: true,
        }
    }
}

impl Drop for ConnTrace {
    fn drop(&mut self) {
        if self.quiet {
            debug!("vsock connection closed port={} id={}", self.port, self.id);
        } else {
            info!("vsock connection closed port={} id={}", self.port, self.id);
        }
    }
}
