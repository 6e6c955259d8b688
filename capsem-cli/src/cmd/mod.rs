//! One module per `capsem` command, each a `run` returning
//! `Result<Exit, CliError>`; `main`'s dispatcher is the only place that
//! knows them all. Commands never import each other: what two share lives in a
//! module outside `cmd/` ([`crate::vmctl`], [`crate::request`],
//! [`crate::follow`], ...).
//!
//! Every VM command (all but `shell` without NAME, `run`, `doctor`,
//! `completions`, `man` and `image`) first resolves the home
//! ([`crate::context::Ctx::new`]) and sweeps what crashes left
//! ([`crate::sweep`]).

pub mod audit;
pub mod completions;
pub mod cp;
pub mod create;
pub mod diff;
pub mod doctor;
pub mod exec;
pub mod image;
pub mod inspect;
pub mod list;
pub mod logs;
pub mod man;
pub mod rm;
pub mod run;
pub mod shell;
pub mod start;
pub mod stop;
