//! Command-line parsing (clap): global flags, and the subcommands as an
//! enum, one variant per module of [`crate::cmd`]. `completions` and `man`
//! are generated from these definitions.

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
    /// Without NAME: start a temporary VM, attach this terminal to its
    /// shell, and destroy the VM when the shell exits (like `docker run
    /// --rm -it`); `~.` at the start of a line destroys it at once and
    /// exits 255. With NAME: attach to the persistent VM's shell (Ctrl-],
    /// or `~.` at the start of a line, detaches and leaves it running;
    /// recent output is replayed first). `~?` lists the escapes.
    Shell {
        /// A persistent VM made with `capsem create`
        name: Option<String>,
        #[command(flatten)]
        new: NewVmArgs,
    },
    /// Create a persistent VM, boot it, and return once its agent is ready.
    Create(CreateArgs),
    /// List VMs: name, state, kind, created time.
    List {
        /// One JSON array (see docs/cli-json.md)
        #[arg(long)]
        json: bool,
    },
    /// One VM as JSON: name, state, kind, pids, created time, accelerator,
    /// image, the agent's connection count, the last shell exit.
    Inspect { name: String },
    /// Stop a persistent VM: the agent ends the shell, syncs and powers the
    /// VM off; whatever is left after the grace period is killed.
    Stop {
        name: String,
        /// Seconds to wait for the graceful stop before killing
        #[arg(long, value_name = "SECS", default_value_t = 10)]
        grace: u64,
    },
    /// Boot a stopped persistent VM again, with the same name, settings,
    /// logs and records. The guest's files live in its memory (the image is
    /// an initramfs), so they start fresh.
    Start { name: String },
    /// Remove a VM and everything it keeps. A running VM is refused unless
    /// --force, which stops it first.
    Rm {
        /// Stop the VM first if it is running
        #[arg(short, long)]
        force: bool,
        name: String,
    },
    /// Print a VM's log.
    Logs {
        name: String,
        /// Keep printing as the log grows, until the VM stops
        #[arg(short, long)]
        follow: bool,
        /// Which log: capsem-process's own, or the guest's serial console
        #[arg(long, value_enum, default_value_t = LogSource::Process)]
        source: LogSource,
    },
    /// Run one command in a temporary VM and destroy the VM when it ends
    /// (like `docker run --rm`). Its stdout and stderr arrive separately and
    /// byte for byte, stdin is forwarded up to its EOF, and capsem exits
    /// with the command's status (124 on timeout, 126 not executable, 127
    /// not found, 128+N killed by signal N, 125 capsem failed).
    Run(RunArgs),
    /// Run one command in a running persistent VM, beside its shell and any
    /// other commands (same streams, flags and exit codes as `run`).
    Exec(ExecArgs),
    /// Copy files and directories between a running persistent VM and this
    /// host, like `docker cp`: one side `NAME:PATH`, the other a host path
    /// or `-` (a tar stream on stdin for SRC, unpacked into the VM's
    /// directory DST; on stdout for DST). Recursive; modes, symlinks and
    /// mtimes kept. DST an existing directory: SRC goes into it (`SRC/.`:
    /// its contents); a missing DST is created, its parent must exist.
    /// Exits 0 when done, 1 when the copy failed, 125 on a usage error or
    /// a VM that is unknown or stopped.
    Cp {
        /// `NAME:PATH`, a host path, or `-`
        src: String,
        /// `NAME:PATH`, a host path, or `-`
        dst: String,
    },
    /// List what the guest changed on a running persistent VM's overlay
    /// shares (`-v DIR:PATH:overlay`): `A PATH` added, `C PATH` changed,
    /// `D PATH` deleted, paths as the guest sees them, sorted.
    Diff {
        name: String,
        /// One JSON array of `{"kind", "path"}` (see docs/cli-json.md)
        #[arg(long)]
        json: bool,
    },
    /// Show the guest's execve audit records: time, pid, uid, argv, cwd.
    Audit {
        name: String,
        /// Keep printing new records until the VM stops
        #[arg(short, long)]
        follow: bool,
        /// The stored JSON lines as they are (see docs/cli-json.md)
        #[arg(long)]
        json: bool,
        /// The guest's connection records instead (`net.jsonl`, see
        /// docs/network.md)
        #[arg(long, conflicts_with = "follow")]
        net: bool,
    },
    /// Check that this host can run capsem: qemu, vhost-device-vsock, the
    /// accelerator, the guest image, capsem-process, capsem-agent and a
    /// writable home. One line per check, `ok`, `warn` or `missing`, with a
    /// `fix:` command below each missing piece. Exits 0 when nothing is
    /// missing, 1 otherwise.
    Doctor,
    /// Print a completion script for SHELL on stdout (e.g. `capsem
    /// completions bash > /etc/bash_completion.d/capsem`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print capsem's manual page (roff) on stdout (`capsem man | man -l -`).
    Man,
    /// OCI images: pull, import, list and remove the cached root
    /// filesystems (see docs/images.md).
    Image {
        #[command(subcommand)]
        command: crate::cmd::image::ImageCommand,
    },
}

/// `capsem create NAME [--cpus N] [--memory MIB] [NEW VM FLAGS]`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// 1 to 48 characters: letters, digits, '-', '_', '.', starting with a
    /// letter or digit
    pub name: String,
    /// Guest vCPUs [default: 2, or the host's CPUs if fewer]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: Option<u32>,
    /// Guest memory in MiB [default: 1024, or half the host's memory if less]
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(64..=65536))]
    pub memory: Option<u32>,
    /// Stop the VM after DUR with no client attached and no exec running
    /// (DUR: a number and ms, s, m, h or d: 30s, 10m, 2h)
    #[arg(long, value_name = "DUR", value_parser = capsem_host::resources::parse_duration_ms)]
    pub idle_timeout: Option<u64>,
    /// Stop the VM DUR after each start, attached or not
    #[arg(long, value_name = "DUR", value_parser = capsem_host::resources::parse_duration_ms)]
    pub max_duration: Option<u64>,
    #[command(flatten)]
    pub new: NewVmArgs,
}

/// What `shell`, `run` and `create` take for a new VM.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NewVmArgs {
    /// Size of the VM's writable disk (sparse; made at its first boot):
    /// bytes, or with a K, M, G or T suffix (powers of 1024), 64M to 16T
    /// [default: 8G]
    #[arg(long, value_name = "SIZE", value_parser = capsem_host::resources::parse_size)]
    pub disk_size: Option<u64>,
    /// Boot this OCI image's root filesystem instead of the default one
    /// (cached, else pulled first, like `docker run`; see `capsem image`).
    /// Its Env, WorkingDir and User apply to the shell and to commands.
    /// Needs a VM: with `--vmm none` it is refused (exit 125)
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// A Docker config file with the registry's credentials for --image
    /// [default: $DOCKER_CONFIG/config.json, else ~/.docker/config.json]
    #[arg(long, value_name = "FILE", requires = "image")]
    pub registry_auth: Option<std::path::PathBuf>,
    /// Egress policy, repeatable: `none` (the default: no connection leaves
    /// the guest), `open` (any public address), `allow=RULE[,RULE...]` (a
    /// host name, `*.domain`, an IP address or CIDR, each with an optional
    /// `:PORT`). Loopback, private and metadata addresses only when a rule
    /// names them. Needs a VM: refused with `--vmm none` (exit 125)
    #[arg(long, value_name = "VALUE")]
    pub net: Vec<String>,
    /// More of the policy from a TOML or JSON file (`open = BOOL`, `allow =
    /// [RULE...]`)
    #[arg(long, value_name = "FILE")]
    pub net_policy: Option<std::path::PathBuf>,
    /// Share a host directory with the guest (repeatable): an absolute
    /// HOST_DIR, an absolute GUEST_PATH, and MODE `rw` (the default: live,
    /// read-write), `ro` (writes fail), or `overlay` (the guest's changes go
    /// to the VM's disk and the host directory is never touched; see
    /// `capsem diff`). Needs a VM: with `--vmm none` it is refused (exit 125)
    #[arg(
        short = 'v',
        long = "volume",
        value_name = "HOST_DIR:GUEST_PATH[:MODE]"
    )]
    pub volumes: Vec<String>,
    /// Publish a guest port on the host (repeatable): capsem-process
    /// listens on HOST_IP:HOST_PORT (HOST_IP defaults to 127.0.0.1; an IPv6
    /// one in brackets) and relays each connection to the guest's
    /// 127.0.0.1:GUEST_PORT. A port in use is refused (exit 125). Needs a
    /// VM: with `--vmm none` it is refused (exit 125)
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT"
    )]
    pub publish: Vec<String>,
}

/// Which log `capsem logs` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogSource {
    /// `process.log`: capsem-process's events
    Process,
    /// `serial.log`: the guest console (qemu VMs), or `agent.log` (`--vmm none`)
    Serial,
}

/// `capsem run [COMMAND FLAGS] [--audit-log FILE] -- CMD [ARG...]`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub cmd: CommandArgs,
    #[command(flatten)]
    pub new: NewVmArgs,
    /// Append the guest's execve audit records, then its network records
    /// (JSON lines; a network record has a "kind"), to FILE before the
    /// temporary VM is destroyed
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
}

/// `capsem exec NAME [COMMAND FLAGS] -- CMD [ARG...]`.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// A running persistent VM
    pub name: String,
    #[command(flatten)]
    pub cmd: CommandArgs,
}

/// What `run` and `exec` share: the command and how it runs.
#[derive(Debug, clap::Args)]
pub struct CommandArgs {
    /// Run the command on a pseudo-terminal (one stream, like ssh -t);
    /// without it stdout and stderr stay apart
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Stop the command (SIGTERM to its process group, SIGKILL 2 s later)
    /// after this many seconds, and exit 124
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<u64>,
    /// Set an environment variable for the command (`KEY` alone takes the
    /// value from capsem's own environment). Variables that change how
    /// programs start (LD_*, BASH_ENV, IFS...) are refused with exit 125
    #[arg(short = 'e', long = "env", value_name = "KEY=VAL")]
    pub env: Vec<String>,
    /// The command's working directory inside the guest
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// The command and its arguments (put them after `--`). Options before
    /// the command are capsem's: an unknown one is a usage error (exit
    /// 125), never taken for the command; after the command's name (or
    /// after `--`) every word is the command's. `run --image REF` without
    /// one runs the image's Entrypoint and Cmd (exit 125 if it has none)
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Seconds (a decimal number) to milliseconds, at least 1 ms.
fn parse_timeout(s: &str) -> Result<u64, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    let max = capsem_proto::exec::MAX_TIMEOUT_MS as f64 / 1000.0;
    if !(secs > 0.0 && secs <= max) {
        return Err(format!(
            "the timeout must be more than 0 and at most {max} seconds"
        ));
    }
    Ok(((secs * 1000.0).ceil() as u64).max(1))
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
        assert!(matches!(cli.command, Command::Shell { name: None, .. }));
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
    fn an_unknown_option_before_the_command_is_an_error_not_the_command() {
        for args in [
            &["capsem", "run", "--no-such-flag", "X", "--", "sh"][..],
            &["capsem", "exec", "dev", "--bogus", "--", "sh"],
            &["capsem", "run", "-Z", "sh"],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::UnknownArgument,
                "{args:?}"
            );
            assert!(err.use_stderr());
        }
        // After `--`, or after the command's name, every word is the command's.
        let argv = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Run(r) => r.cmd.command,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            argv(&["capsem", "run", "-t", "--", "ls", "-la", "--color"]),
            ["ls", "-la", "--color"]
        );
        assert_eq!(argv(&["capsem", "run", "--", "--image"]), ["--image"]);
        assert_eq!(
            argv(&["capsem", "run", "ls", "-la", "--", "x"]),
            ["ls", "-la", "--", "x"]
        );
        assert_eq!(
            argv(&["capsem", "run", "sh", "-c", "exit 3"]),
            ["sh", "-c", "exit 3"]
        );
    }

    #[test]
    fn new_vm_flags() {
        let cli =
            Cli::try_parse_from(["capsem", "run", "--disk-size", "1G", "--", "true"]).unwrap();
        let Command::Run(r) = cli.command else {
            panic!()
        };
        assert_eq!(r.new.disk_size, Some(1 << 30));
        let cli = Cli::try_parse_from(["capsem", "create", "a", "--disk-size", "64M"]).unwrap();
        let Command::Create(c) = cli.command else {
            panic!()
        };
        assert_eq!(
            (c.new.disk_size, c.cpus, c.memory),
            (Some(64 << 20), None, None)
        );
        assert!(Cli::try_parse_from(["capsem", "shell", "--disk-size", "1M"]).is_err());
        let cli =
            Cli::try_parse_from(["capsem", "shell", "--image", "a:1", "--registry-auth", "/c"])
                .unwrap();
        let Command::Shell { new, .. } = cli.command else {
            panic!()
        };
        assert_eq!(new.image.as_deref(), Some("a:1"));
        assert!(Cli::try_parse_from(["capsem", "shell", "--registry-auth", "/c"]).is_err());
        let cli = Cli::try_parse_from([
            "capsem", "run", "-v", "/a:/b", "--volume", "/c:/d:ro", "--", "true",
        ])
        .unwrap();
        let Command::Run(r) = cli.command else {
            panic!()
        };
        assert_eq!(r.new.volumes, ["/a:/b", "/c:/d:ro"]);
        let cli = Cli::try_parse_from([
            "capsem",
            "create",
            "a",
            "-p",
            "8080:80",
            "--publish",
            "[::1]:1:2",
        ])
        .unwrap();
        let Command::Create(c) = cli.command else {
            panic!()
        };
        assert_eq!(c.new.publish, ["8080:80", "[::1]:1:2"]);
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
