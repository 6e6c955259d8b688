//! Command-line parsing (clap). Subcommands are an enum so that `create`,
//! `list` and `exec` can be added beside `shell` and `doctor`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Run an interactive shell inside a hardware-isolated Linux VM.
#[derive(Debug, Parser)]
#[command(name = "capsem", version, after_long_help = crate::exit::HELP)]
pub struct Cli {
    /// capsem's state directory [default: $CAPSEM_HOME, else ~/.capsem]
    #[arg(long, global = true, value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// How the guest runs: `qemu` (a VM) or `none` (on this host, no
    /// isolation; for development)
    #[arg(
        long,
        global = true,
        value_enum,
        env = "CAPSEM_VMM",
        default_value_t = Vmm::Qemu
    )]
    pub vmm: Vmm,

    /// Accelerator for `--vmm qemu`, passed to capsem-process, which decides:
    /// `auto` uses KVM only where kvm_intel or kvm_amd is loaded and /dev/kvm
    /// opens read-write, else TCG (slower)
    #[arg(
        long,
        global = true,
        value_enum,
        env = "CAPSEM_ACCEL",
        default_value_t = AccelChoice::Auto
    )]
    pub accel: AccelChoice,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a temporary VM, attach this terminal to its shell, and destroy
    /// the VM when the shell exits (like `docker run --rm -it`).
    Shell,
    /// Check that this host can run capsem: qemu, vhost-device-vsock, the
    /// accelerator, the guest image, capsem-process, capsem-agent and a
    /// writable home. One line per check, `ok`, `warn` or `missing`, with a
    /// `fix:` command below each missing piece. Exits 0 when nothing is
    /// missing, 1 otherwise.
    Doctor,
}

/// The backend capsem-process uses to run the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Vmm {
    Qemu,
    None,
}

impl Vmm {
    /// The value passed to `capsem-process --vmm`.
    pub fn as_arg(self) -> &'static str {
        match self {
            Vmm::Qemu => "qemu",
            Vmm::None => "none",
        }
    }
}

/// The accelerator asked for (`--accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

impl AccelChoice {
    /// The value passed to `capsem-process --accel`.
    pub fn as_arg(self) -> &'static str {
        match self {
            AccelChoice::Auto => "auto",
            AccelChoice::Kvm => "kvm",
            AccelChoice::Tcg => "tcg",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_global_flags_after_the_subcommand() {
        let cli =
            Cli::try_parse_from(["capsem", "shell", "--vmm", "none", "--home", "/x"]).unwrap();
        assert_eq!(cli.vmm, Vmm::None);
        assert_eq!(cli.home, Some(PathBuf::from("/x")));
        assert!(matches!(cli.command, Command::Shell));
    }

    #[test]
    fn accel_defaults_to_auto_and_parses_anywhere() {
        let cli = Cli::try_parse_from(["capsem", "shell"]).unwrap();
        if std::env::var_os("CAPSEM_ACCEL").is_none() {
            assert_eq!(cli.accel, AccelChoice::Auto);
        }
        let cli = Cli::try_parse_from(["capsem", "doctor", "--accel", "tcg"]).unwrap();
        assert_eq!(cli.accel, AccelChoice::Tcg);
        assert!(matches!(cli.command, Command::Doctor));
        assert_eq!(AccelChoice::Kvm.as_arg(), "kvm");
        assert!(Cli::try_parse_from(["capsem", "--accel", "hvf", "shell"]).is_err());
    }

    #[test]
    fn rejects_unknown_backend() {
        assert!(Cli::try_parse_from(["capsem", "--vmm", "kvm", "shell"]).is_err());
    }

    #[test]
    fn long_help_documents_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("125"), "{help}");
        assert!(help.contains("255"), "{help}");
    }
}
