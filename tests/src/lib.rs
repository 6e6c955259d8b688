//! The integration and hypervisor harness: drives the real `capsem` binary
//! through a real PTY, as a user would.
//!
//! * [`pty`]: a terminal for the CLI: send keys, wait for output, resize, wait
//!   for the exit status.
//! * [`procs`]: makes the test process a child subreaper, so every process a
//!   test starts stays its descendant; lists, kills and reaps them, and
//!   asserts none is left.
//! * [`fixture`]: one test's capsem home, its VMs' logs (printed and kept when
//!   the test fails), IPC requests to a VM's capsem-process, and the
//!   nothing-left-behind check.
//! * [`cp`]: `capsem cp` scenarios, hostile guest streams included.
//! * [`net`]: a loopback HTTP server, `net.jsonl` records, `curl` in the
//!   guest, for the network tests.
//! * [`registry`]: a loopback `docker-registry` for the OCI image tests.
//! * [`stages`]: where a temporary VM's time went, from the logs it left
//!   (capsem-bench's `run` breakdown).
//!
//! Each test runs in its own process under cargo-nextest, so "descendants of
//! this process" is exactly "what this test started".

// This crate is test code: a panic is how it reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cp;
pub mod fixture;
pub mod net;
pub mod netserve;
pub mod persist;
pub mod procs;
pub mod pty;
pub mod registry;
pub mod scenarios;
pub mod stages;

pub use fixture::{Backend, Fixture};
