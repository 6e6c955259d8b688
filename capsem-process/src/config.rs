//! Command line (`clap`), exactly the contract in `docs/architecture.md`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use capsem_host::resources::{default_cpus, default_memory_mib, parse_size};
use clap::{Parser, ValueEnum};

pub use crate::vmm::accel::AccelChoice;

/// Which guest backend runs the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VmmKind {
    /// No VM: the agent runs as a host child process (development, tests).
    None,
    /// A QEMU microVM with vhost-device-vsock.
    Qemu,
}

/// `capsem-process` arguments.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "capsem-process",
    version,
    about = "capsem's per-VM host process"
)]
pub struct Config {
    /// The VM directory (created with mode 0700).
    #[arg(long, value_name = "DIR")]
    pub vm_dir: PathBuf,
    /// The VM's name, reported to clients.
    #[arg(long, value_name = "ID", value_parser = parse_vm_id)]
    pub vm_id: String,
    /// Guest backend.
    #[arg(long, value_enum)]
    pub vmm: VmmKind,
    /// Destroy the VM (and its directory) when the attached client goes away.
    #[arg(long)]
    pub temporary: bool,
    /// Run one command instead of a shell: the agent starts in exec mode and
    /// the client sends the command with `Exec` on ctl.sock.
    #[arg(long)]
    pub exec: bool,
    /// Take over the running guest recorded in `<vm-dir>/pids.json` (its
    /// capsem-process died) instead of starting one: each process is adopted
    /// only if its start time and recorded argv element match.
    #[arg(long, conflicts_with_all = ["temporary", "exec"])]
    pub adopt: bool,
    /// Inherited fd that receives `ready\n` or `error: <reason>\n`, then is closed.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(3..))]
    pub ready_fd: Option<i32>,
    /// Heartbeat period towards the guest, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub heartbeat_ms: u64,
    /// Consecutive unanswered pings before the guest is reported unresponsive.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub missed_pongs: u32,
    /// Accelerator for qemu: auto uses KVM only where kvm_intel or kvm_amd is
    /// loaded and /dev/kvm opens, else TCG.
    #[arg(long, value_enum, env = "CAPSEM_ACCEL", default_value = "auto")]
    pub accel: AccelChoice,
    /// Guest image directory (default: <home>/images/default, where the VM
    /// directory is <home>/vms/<id>).
    #[arg(long, value_name = "DIR", env = "CAPSEM_IMAGE_DIR")]
    pub image_dir: Option<PathBuf>,
    /// Guest memory in MiB (default: 1024, or half the host's memory if less).
    #[arg(long, default_value_t = default_memory_mib(), value_parser = clap::value_parser!(u32).range(64..=65536))]
    pub memory_mib: u32,
    /// Guest vCPUs (default: 2, or the host's CPUs if fewer).
    #[arg(long, default_value_t = default_cpus(), value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: u32,
    /// Size of the VM's writable disk (`<vm-dir>/disk.img`, sparse), made
    /// at its first qemu boot and kept as it is afterwards: bytes, or with a
    /// K, M, G or T suffix (powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "8G", value_parser = parse_size)]
    pub disk_size: u64,
    /// The read-only root filesystem (an OCI image's `rootfs.erofs`) to boot
    /// instead of the image directory's; kernel and initramfs stay its.
    #[arg(long, value_name = "FILE", value_parser = parse_absolute)]
    pub rootfs: Option<PathBuf>,
    /// The OCI image's run settings (its cached `config.json`: Env,
    /// WorkingDir, User), copied onto a new writable disk for the guest.
    #[arg(long, value_name = "FILE", value_parser = parse_absolute, requires = "rootfs")]
    pub image_config: Option<PathBuf>,
    /// How long the guest may take to connect (default: 10000 for none, 120000 for qemu).
    #[arg(
        long,
        value_name = "N",
        env = "CAPSEM_BOOT_TIMEOUT_MS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub boot_timeout_ms: Option<u64>,
    /// At teardown (before a temporary VM's directory is removed), append
    /// the stored audit records (`audit.jsonl.1`, then `audit.jsonl`) to
    /// FILE, created with mode 0600 if missing. An absolute path.
    #[arg(long, value_name = "FILE", value_parser = parse_absolute)]
    pub audit_log: Option<PathBuf>,
    /// A persistent VM: stop it (as `capsem stop` does) after this many
    /// milliseconds with no client attached and no exec running.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_ms: Option<u64>,
    /// A persistent VM: stop it this many milliseconds after it started.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_duration_ms: Option<u64>,
    /// The egress policy, repeatable, as `capsem --net` spells it (`none`,
    /// `open`, `allow=RULE[,RULE...]`); none given: `none`. Anything but
    /// `none` needs `--vmm qemu`.
    #[arg(long, value_name = "VALUE")]
    pub net: Vec<String>,
    /// A host directory for the guest (repeatable, qemu only), as
    /// `MODE:HEX(HOST_DIR):HEX(GUEST_PATH)` (see capsem_host::share).
    #[arg(long = "share", value_name = "MODE:HEX:HEX", value_parser = parse_share)]
    pub shares: Vec<capsem_host::share::Share>,
    /// A published port (repeatable, qemu only), as `IP:HOST_PORT:GUEST_PORT`
    /// (`[IPv6]:...`): listened on before the VM is ready, each connection
    /// relayed to the guest's 127.0.0.1:GUEST_PORT.
    #[arg(long = "publish", value_name = "IP:HOST_PORT:GUEST_PORT", value_parser = parse_publish)]
    pub publish: Vec<capsem_host::publish::Publish>,
}

impl Config {
    /// A persistent VM's shell: not temporary and not one command.
    pub fn persistent(&self) -> bool {
        !self.temporary && !self.exec
    }

    /// `CAPSEM_MODE` for the agent: `exec` (one command), `persistent` (a
    /// fresh shell after each exit) or `shell` (one shell).
    pub fn agent_mode(&self) -> &'static str {
        if self.exec {
            "exec"
        } else if self.temporary {
            "shell"
        } else {
            "persistent"
        }
    }

    /// The `--net` values as a policy; refused when `--vmm none` could not
    /// enforce it.
    pub fn net_policy(&self) -> Result<capsem_net::Policy, String> {
        let policy = capsem_net::Policy::from_args(&self.net).map_err(|e| e.to_string())?;
        if self.vmm == VmmKind::None && !policy.is_none() {
            return Err(format!(
                "--net {} needs --vmm qemu: --vmm none cannot enforce it",
                policy.describe()
            ));
        }
        Ok(policy)
    }

    /// The `--publish` ports; refused with `--vmm none`, whose agent has
    /// no vsock listener (and whose ports are the host's anyway).
    pub fn check_publish(&self) -> Result<(), String> {
        if self.vmm == VmmKind::None && !self.publish.is_empty() {
            return Err("--publish needs --vmm qemu".into());
        }
        Ok(())
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    /// The capsem home: the VM directory is `<home>/vms/<id>`.
    pub fn home(&self) -> PathBuf {
        self.vm_dir
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    pub fn image_dir(&self) -> PathBuf {
        self.image_dir
            .clone()
            .unwrap_or_else(|| self.home().join("images/default"))
    }

    /// Per-host runtime state shared by VMs (CID leases).
    pub fn run_dir(&self) -> PathBuf {
        self.home().join("run")
    }

    pub fn boot_timeout(&self) -> Duration {
        Duration::from_millis(self.boot_timeout_ms.unwrap_or(match self.vmm {
            VmmKind::None => 10_000,
            VmmKind::Qemu => 120_000,
        }))
    }
}

/// `--audit-log`: our working directory is not the caller's.
fn parse_absolute(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err("expected an absolute path".into())
    }
}

/// `--share`: the CLI already checked it; checked again, it is our input.
fn parse_share(s: &str) -> Result<capsem_host::share::Share, String> {
    capsem_host::share::Share::parse_arg(s).map_err(|e| e.to_string())
}

/// `--publish`: the CLI already checked it; checked again, it is our input.
fn parse_publish(s: &str) -> Result<capsem_host::publish::Publish, String> {
    capsem_host::publish::Publish::parse(s).map_err(|e| e.to_string())
}

/// A VM id names files and appears in logs: keep it short and plain.
fn parse_vm_id(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(s.to_owned())
    } else {
        Err("expected 1 to 64 characters from [A-Za-z0-9._-]".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("capsem-process").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = parse(&["--vm-dir", "/x", "--vm-id", "a-1", "--vmm", "none"]).unwrap();
        assert!(!c.temporary);
        assert!(!c.exec);
        assert_eq!(c.heartbeat(), Duration::from_secs(1));
        assert_eq!(c.missed_pongs, 3);
        assert_eq!(c.boot_timeout(), Duration::from_secs(10));
        let c = parse(&["--vm-dir", "/x", "--vm-id", "a", "--vmm", "qemu"]).unwrap();
        assert_eq!(c.boot_timeout(), Duration::from_secs(120));
        assert_eq!(c.disk_size, 8 << 30);
        assert!((1..=2).contains(&c.cpus));
        assert!((128..=1024).contains(&c.memory_mib));
    }

    #[test]
    fn disk_size_flag() {
        let c = parse(&[
            "--vm-dir",
            "/x",
            "--vm-id",
            "a",
            "--vmm",
            "qemu",
            "--disk-size",
            "1G",
        ])
        .unwrap();
        assert_eq!(c.disk_size, 1 << 30);
        assert!(parse(&[
            "--vm-dir",
            "/x",
            "--vm-id",
            "a",
            "--vmm",
            "qemu",
            "--disk-size",
            "1M"
        ])
        .is_err());
    }

    #[test]
    fn net_values() {
        let base = ["--vm-dir", "/x", "--vm-id", "a", "--vmm"];
        let with = |vmm: &str, net: &[&str]| {
            let mut args: Vec<&str> = base.to_vec();
            args.push(vmm);
            for v in net {
                args.extend(["--net", v]);
            }
            parse(&args).unwrap().net_policy()
        };
        assert!(with("none", &[]).unwrap().is_none());
        assert!(with("none", &["none"]).unwrap().is_none());
        assert!(with("none", &["open"]).is_err());
        let p = with("qemu", &["allow=a.b:80", "allow=127.0.0.1:80"]).unwrap();
        assert_eq!(p.rules.len(), 2);
        assert!(with("qemu", &["allow=a..b"]).is_err());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse(&["--vm-dir", "/x", "--vm-id", "a/b", "--vmm", "none"]).is_err());
        assert!(parse(&["--vm-dir", "/x", "--vm-id", "a", "--vmm", "kvm"]).is_err());
        assert!(parse(&[
            "--vm-dir",
            "/x",
            "--vm-id",
            "a",
            "--vmm",
            "none",
            "--ready-fd",
            "1"
        ])
        .is_err());
        assert!(parse(&["--vm-id", "a", "--vmm", "none"]).is_err());
        assert!(parse(&[
            "--vm-dir",
            "/x",
            "--vm-id",
            "a",
            "--vmm",
            "none",
            "--audit-log",
            "rel"
        ])
        .is_err());
        let c = parse(&[
            "--vm-dir",
            "/x",
            "--vm-id",
            "a",
            "--vmm",
            "none",
            "--audit-log",
            "/tmp/a.jsonl",
        ])
        .unwrap();
        assert_eq!(c.audit_log, Some(PathBuf::from("/tmp/a.jsonl")));
    }

    #[test]
    fn share_flags() {
        let base = ["--vm-dir", "/x", "--vm-id", "a", "--vmm", "qemu"];
        let c = parse(
            &[
                &base[..],
                &["--share", "ro:2f73:2f77", "--share", "rw:2f:2f61"],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(c.shares.len(), 2);
        assert_eq!(c.shares[0].guest, "/w");
        assert_eq!(c.shares[1].host, PathBuf::from("/"));
        assert!(parse(&[&base[..], &["--share", "rw:2f:2f"]].concat()).is_err());
        assert!(parse(&base).unwrap().shares.is_empty());
    }

    #[test]
    fn publish_flags() {
        let base = ["--vm-dir", "/x", "--vm-id", "a", "--vmm", "qemu"];
        let c = parse(
            &[
                &base[..],
                &["--publish", "127.0.0.1:8080:80", "--publish", "[::1]:1:2"],
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(c.publish.len(), 2);
        assert_eq!(c.publish[1].to_arg(), "[::1]:1:2");
        assert!(c.check_publish().is_ok());
        assert!(parse(&[&base[..], &["--publish", "0:80"]].concat()).is_err());
        let none = [
            "--vm-dir",
            "/x",
            "--vm-id",
            "a",
            "--vmm",
            "none",
            "--publish",
            "1:2",
        ];
        assert!(parse(&none).unwrap().check_publish().is_err());
    }
}
