//! One module per `capsem` command, each a `run` returning
//! `Result<Exit, CliError>`, and [`dispatch`], the only place that knows
//! them all. Commands never import each other: what two share lives in a
//! module outside `cmd/` ([`crate::vmctl`], [`crate::request`],
//! [`crate::follow`], ...).
//!
//! Every VM command (all but `shell` without NAME, `run`, `doctor`,
//! `completions` and `man`) first resolves the home ([`Ctx::new`]) and
//! sweeps what crashes left ([`crate::sweep`]).

pub mod audit;
pub mod completions;
pub mod create;
pub mod doctor;
pub mod exec;
pub mod inspect;
pub mod list;
pub mod logs;
pub mod man;
pub mod rm;
pub mod run;
pub mod shell;
pub mod start;
pub mod stop;

use crate::cli::{AccelChoice, Cli, Command, Vmm};
use crate::context::Ctx;
use crate::error::CliError;
use crate::exit::Exit;

/// The VM commands: the home resolved, then the sweep, then the command.
fn vm_command(
    home: Option<&std::path::Path>,
    vmm: Vmm,
    accel: AccelChoice,
    run: impl FnOnce(&Ctx) -> Result<Exit, CliError>,
) -> Result<Exit, CliError> {
    let ctx = Ctx::new(home, vmm, accel)?;
    crate::sweep::sweep(&ctx);
    run(&ctx)
}

/// Runs the parsed command line's command.
pub fn dispatch(cli: Cli) -> Result<Exit, CliError> {
    let Cli {
        home,
        vmm,
        accel,
        command,
    } = cli;
    let home = home.as_deref();
    match command {
        Command::Shell { name: None } => shell::run_temporary(home, vmm, accel),
        Command::Run(args) => run::run(home, vmm, accel, args),
        Command::Doctor => Ok(doctor::run(home, vmm, accel)),
        Command::Completions { shell } => completions::run(shell),
        Command::Man => man::run(),
        Command::Create(args) => vm_command(home, vmm, accel, |ctx| create::run(ctx, &args)),
        Command::Shell { name: Some(name) } => {
            vm_command(home, vmm, accel, |ctx| shell::run_named(ctx, &name))
        }
        Command::Start { name } => vm_command(home, vmm, accel, |ctx| start::run(ctx, &name)),
        Command::Stop { name, grace } => {
            vm_command(home, vmm, accel, |ctx| stop::run(ctx, &name, grace))
        }
        Command::List { json } => vm_command(home, vmm, accel, |ctx| list::run(ctx, json)),
        Command::Inspect { name } => vm_command(home, vmm, accel, |ctx| inspect::run(ctx, &name)),
        Command::Rm { force, name } => {
            vm_command(home, vmm, accel, |ctx| rm::run(ctx, &name, force))
        }
        Command::Logs {
            name,
            follow,
            source,
        } => vm_command(home, vmm, accel, |ctx| {
            logs::run(ctx, &name, follow, source)
        }),
        Command::Exec(args) => vm_command(home, vmm, accel, |ctx| exec::run(ctx, args)),
        Command::Audit { name, follow, json } => {
            vm_command(home, vmm, accel, |ctx| audit::run(ctx, &name, follow, json))
        }
    }
}
