//! `capsem diff NAME [--json]`: what the guest changed on each `overlay`
//! share of a running persistent VM ([`crate::overlaydiff`]), one `A PATH`,
//! `C PATH` or `D PATH` line per change, sorted; `--json` prints an array
//! of `{ "kind": "A"|"C"|"D", "path": string }` (docs/cli-json.md).
//!
//! The guest's listings come through `capsem exec` (this same binary as a
//! child, its stdout piped and bounded), so they travel the one exec path
//! every command uses, with its adoption of an orphaned VM.

use std::io::Read;
use std::process::{Command, Stdio};

use capsem_host::share::ShareMode;

use crate::context::Ctx;
use crate::error::CliError;
use crate::exit::Exit;
use crate::output::write_stdout;
use crate::overlaydiff::{self, Change, DiffError, MAX_LISTING};
use crate::vms::VmState;

/// Prints the changes; exit code 0.
pub fn run(ctx: &Ctx, name: &str, json: bool) -> Result<Exit, CliError> {
    let vm = crate::vmctl::persistent(ctx, name)?;
    if vm.state() == VmState::Stopped {
        return Err(CliError::WrongState {
            name: name.into(),
            state: VmState::Stopped,
            hint: "; capsem diff reads a running VM's overlay (capsem start NAME)",
        });
    }
    let config = vm.config.clone().ok_or(CliError::NoSuchVm(name.into()))?;
    let mut changes: Vec<Change> = Vec::new();
    for (i, share) in config.shares.iter().enumerate() {
        if share.mode != ShareMode::Overlay {
            continue;
        }
        let upper_dir = format!("/run/capsem/shares/{}", capsem_host::share::tag(i));
        let upper = guest_listing(ctx, name, &upper_dir, "%y %P\\0")?;
        let merged = guest_listing(ctx, name, &share.guest, "%P\\0")?;
        let host = overlaydiff::host_tree(&share.host)?;
        changes.extend(overlaydiff::compute(
            &share.guest,
            &overlaydiff::parse_typed(&upper),
            &overlaydiff::parse_paths(&merged),
            &host,
        ));
    }
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    let text = if json {
        let mut t = serde_json::to_string_pretty(&changes).unwrap_or_else(|_| "[]".into());
        t.push('\n');
        t
    } else {
        changes
            .iter()
            .map(|c| format!("{} {}\n", c.kind, c.path))
            .collect()
    };
    write_stdout(text.as_bytes())?;
    Ok(Exit::OK)
}

/// `find DIR -mindepth 1 -printf FORMAT` in the guest, its stdout.
fn guest_listing(ctx: &Ctx, name: &str, dir: &str, format: &str) -> Result<Vec<u8>, DiffError> {
    let exe = std::env::current_exe().map_err(DiffError::Spawn)?;
    let mut child = Command::new(exe)
        .arg("--home")
        .arg(&ctx.home)
        .arg("--vmm")
        .arg(ctx.vmm.as_arg())
        .args([
            "exec",
            name,
            "--",
            "find",
            dir,
            "-mindepth",
            "1",
            "-printf",
            format,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Its complaints (and capsem exec's one line) reach the user as
        // they are; reading two pipes here could deadlock.
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(DiffError::Spawn)?;
    let mut out = Vec::new();
    let read = child
        .stdout
        .take()
        .map(|s| s.take(MAX_LISTING + 1).read_to_end(&mut out));
    if out.len() as u64 > MAX_LISTING {
        let _ = child.kill();
        let _ = child.wait();
        return Err(DiffError::TooLarge(dir.into()));
    }
    let status = child.wait().map_err(DiffError::Spawn)?;
    if let Some(Err(e)) = read {
        return Err(DiffError::Spawn(e));
    }
    if !status.success() {
        return Err(DiffError::Guest {
            what: dir.into(),
            status: status.code().unwrap_or(-1),
        });
    }
    Ok(out)
}
