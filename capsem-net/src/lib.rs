//! capsem's egress policy, decided on the host for every connection the
//! guest attempts (issue: network).
//!
//! - [`rule`]: one `--net allow=` rule (a host name, a `*.` wildcard, an IP
//!   address or a CIDR, each with an optional port) and its parser.
//! - [`ranges`]: the address ranges no rule-less policy reaches (loopback,
//!   private, link-local, cloud metadata, ...), so that `--net open` means
//!   "the public internet" and never the host or its LAN.
//! - [`policy`]: `--net none | open | allow=...`, the questions capsem-process
//!   asks (may this name be resolved? may this resolved address be dialled?)
//!   and the [`policy::Verdict`] that names the rule that decided.
//! - [`file`]: `--net-policy FILE`, TOML or JSON.
//! - [`rate`]: the token bucket and the once-per-interval count that bound
//!   a guest's flood of questions (the agent's and the host's).
//!
//! Everything here is pure: no sockets, no resolver, no clock.

pub mod file;
pub mod policy;
pub mod ranges;
pub mod rate;
pub mod rule;

pub use policy::{Policy, Verdict};
pub use rule::{Rule, RuleError, Target};
