//! `capsem doctor`: can this host run capsem, and if not, the command that
//! fixes each missing piece. The checks are [`crate::checks`] and the host
//! jail's [`crate::jailcheck`], the report's
//! format [`crate::health`]. Exit status: 0 when nothing is `missing`, 1
//! otherwise.

use std::io::Write;
use std::path::Path;

use crate::checks::{checks, Inputs};
use crate::cli::{AccelChoice, Vmm};
use crate::exit::Exit;
use crate::health::{exit_code, Check};

/// `capsem doctor`: prints the report and returns the exit code.
pub fn run(home_flag: Option<&Path>, vmm: Vmm, accel: AccelChoice) -> Exit {
    let mut all = checks(&Inputs::from_host(home_flag, vmm, accel));
    all.extend(crate::jailcheck::checks(
        nix::unistd::geteuid().as_raw(),
        &capsem_host::cgroup::probe(),
    ));
    let text: String = all.iter().map(Check::render).collect();
    let mut out = std::io::stdout().lock();
    // A closed stdout (`capsem doctor | head -1`) must not hide the verdict.
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    exit_code(&all)
}
