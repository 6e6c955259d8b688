//! `capsem inspect NAME`: one VM as a pretty JSON object ([`Inspect`]),
//! whose shape is documented in `docs/cli-json.md` and only grows.
//!
//! Only live processes are listed (each checked by identity); counters
//! and the last shell exit come from `status.json`, which survives a stop,
//! so they describe the latest run.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use capsem_host::share::Share;
use capsem_host::vmstate::VmImage;
use serde::Serialize;

use crate::context::Ctx;
use crate::error::CliError;
use crate::exit::Exit;
use crate::output::write_stdout;
use crate::vms::{Vm, VmState};

/// `capsem inspect`'s object. Fields are only ever added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inspect {
    pub name: String,
    pub state: VmState,
    pub temporary: bool,
    /// RFC 3339, UTC; `null` when the VM has no `vm.json`.
    pub created: Option<String>,
    pub vmm: Option<String>,
    /// The accelerator in use as capsem-process last reported it (`kvm`,
    /// `tcg`, `none`), else the one asked for (`auto`, `kvm`, `tcg`).
    pub accel: Option<String>,
    /// The guest image directory, as capsem-process last reported it.
    pub image: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    /// The OCI image the root filesystem comes from; `null`: the default.
    pub oci_image: Option<VmImage>,
    /// The host directories shared with the guest (`-v`), in order.
    pub shares: Vec<Share>,
    /// `<dir>/disk.img`, once a qemu boot made it.
    pub disk: Option<InspectDisk>,
    /// The egress policy as `--net` values; `[]`: `--net none`.
    pub net: Option<Vec<String>>,
    /// The published ports (`-p`), in order.
    pub publish: Vec<capsem_host::publish::Publish>,
    pub pids: InspectPids,
    pub agent_connects: u64,
    pub boots: u64,
    pub adoptions: u64,
    pub last_shell_exit: Option<InspectShellExit>,
    /// The VM directory.
    pub dir: String,
    /// `create --idle-timeout` and `--max-duration` (`5s`, `2h`); absent
    /// when not set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<String>,
    /// Why a stopped VM stopped itself (`idle timeout 5s`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
}

/// The VM's writable disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InspectDisk {
    pub path: String,
    /// Its apparent size.
    pub size_bytes: u64,
    /// What the sparse file really uses (`st_blocks * 512`).
    pub allocated_bytes: u64,
}

impl InspectDisk {
    /// `<dir>/disk.img` when it exists.
    fn of(dir: &Path) -> Option<Self> {
        let path = dir.join(DISK_FILE);
        let meta = std::fs::metadata(&path).ok().filter(|m| m.is_file())?;
        Some(Self {
            path: path.to_string_lossy().into_owned(),
            size_bytes: meta.len(),
            allocated_bytes: meta.blocks().saturating_mul(512),
        })
    }
}

/// The file name capsem-process gives the writable disk.
const DISK_FILE: &str = "disk.img";

/// The VM's live host processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InspectPids {
    /// `null` unless capsem-process is alive.
    pub capsem_process: Option<u32>,
    /// The live guest processes (the agent for `--vmm none`; qemu and
    /// vhost-device-vsock otherwise).
    pub guest: Vec<InspectGuestPid>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InspectGuestPid {
    pub role: String,
    pub pid: u32,
}

/// How the last shell ended: `exit_code` or `signal` (the other `null`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InspectShellExit {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// RFC 3339, UTC.
    pub at: String,
}

impl Inspect {
    pub fn new(vm: &Vm) -> Self {
        let config = vm.config.as_ref();
        let status = vm.status.clone().unwrap_or_default();
        Self {
            name: vm.name.clone(),
            state: vm.state(),
            temporary: vm.temporary(),
            created: config.map(|c| c.created.clone()),
            vmm: config.map(|c| c.vmm.clone()),
            accel: status.accel.or_else(|| config.map(|c| c.accel.clone())),
            image: status.image,
            cpus: config.map(|c| c.cpus),
            memory_mib: config.map(|c| c.memory_mib),
            oci_image: config.and_then(|c| c.image.clone()),
            shares: config.map(|c| c.shares.clone()).unwrap_or_default(),
            disk: InspectDisk::of(&vm.dir),
            net: config.map(|c| c.net.clone()),
            publish: config.map(|c| c.publish.clone()).unwrap_or_default(),
            pids: InspectPids {
                capsem_process: vm
                    .process
                    .as_ref()
                    .filter(|p| p.alive())
                    .map(|p| p.record.pid),
                guest: vm
                    .guest
                    .iter()
                    .filter(|p| p.alive())
                    .map(|p| InspectGuestPid {
                        role: p.record.role.clone(),
                        pid: p.record.pid,
                    })
                    .collect(),
            },
            agent_connects: status.agent_connects,
            boots: status.boots,
            adoptions: status.adoptions,
            last_shell_exit: status.last_shell_exit.map(|e| InspectShellExit {
                exit_code: e.exit_code,
                signal: e.signal,
                at: e.at,
            }),
            dir: vm.dir.to_string_lossy().into_owned(),
            idle_timeout: config
                .and_then(|c| c.idle_timeout_ms)
                .map(capsem_host::resources::format_duration_ms),
            max_duration: config
                .and_then(|c| c.max_duration_ms)
                .map(capsem_host::resources::format_duration_ms),
            stop_reason: vm.stop_reason(),
        }
    }

    /// Pretty JSON and a newline.
    pub fn to_json(&self) -> String {
        // Plain strings, numbers and enums: serializing cannot fail.
        let mut text = serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".into());
        text.push('\n');
        text
    }
}

/// Prints VM `name` as JSON; exit code 0.
pub fn run(ctx: &Ctx, name: &str) -> Result<Exit, CliError> {
    let vm = ctx.load(name)?;
    write_stdout(Inspect::new(&vm).to_json().as_bytes())?;
    Ok(Exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{config, ctx, gone_record, make_vm, Marked};
    use capsem_host::vmstate::{self, Pids, ShellExit, VmStatusFile, STATUS_FILE};

    #[test]
    fn a_running_vm_with_status() {
        let home = tempfile::tempdir().unwrap();
        let mut process = Marked::spawn("capsem-process");
        let mut agent = Marked::spawn("capsem-agent");
        let pids = Pids {
            process: process.record.clone(),
            guest: vec![agent.record.clone(), gone_record("qemu")],
            cid: None,
        };
        let dir = make_vm(
            home.path(),
            "dev",
            Some(&config("dev", false, None)),
            Some(&pids),
        );
        let status = VmStatusFile {
            accel: Some("kvm".into()),
            image: Some("/img".into()),
            agent_connects: 3,
            generation: 2,
            shell_pid: Some(9),
            last_shell_exit: Some(ShellExit {
                exit_code: None,
                signal: Some(9),
                at: "2026-01-02T03:04:06Z".into(),
            }),
            boots: 2,
            adoptions: 1,
            // A running VM's stale reason is not shown.
            stop_reason: Some("idle timeout 5s".into()),
        };
        vmstate::write_json(&dir.join(STATUS_FILE), &status).unwrap();

        let vm = ctx(home.path()).load("dev").unwrap();
        let json: serde_json::Value = serde_json::from_str(&Inspect::new(&vm).to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "dev",
                "state": "running",
                "temporary": false,
                "created": "2026-01-02T03:04:05Z",
                "vmm": "none",
                "accel": "kvm",
                "image": "/img",
                "cpus": 2,
                "memory_mib": 1024,
                "oci_image": null,
                "shares": [],
                "disk": null,
                "net": [],
                "publish": [],
                "pids": {
                    "capsem_process": process.record.pid,
                    "guest": [{ "role": "capsem-agent", "pid": agent.record.pid }],
                },
                "agent_connects": 3,
                "boots": 2,
                "adoptions": 1,
                "last_shell_exit": { "exit_code": null, "signal": 9, "at": "2026-01-02T03:04:06Z" },
                "dir": dir.to_str().unwrap(),
            })
        );
        process.finish();
        agent.finish();
    }

    #[test]
    fn a_vm_stopped_by_its_idle_timeout_says_so() {
        let home = tempfile::tempdir().unwrap();
        let mut cfg = config("dev", false, None);
        cfg.idle_timeout_ms = Some(5000);
        cfg.max_duration_ms = Some(7_200_000);
        cfg.publish = vec![capsem_host::publish::Publish::parse("8080:8000").unwrap()];
        let dir = make_vm(home.path(), "dev", Some(&cfg), None);
        let status = VmStatusFile {
            stop_reason: Some("idle timeout 5s".into()),
            ..VmStatusFile::default()
        };
        vmstate::write_json(&dir.join(STATUS_FILE), &status).unwrap();
        let vm = ctx(home.path()).load("dev").unwrap();
        let json: serde_json::Value = serde_json::from_str(&Inspect::new(&vm).to_json()).unwrap();
        assert_eq!(json["state"], "stopped");
        assert_eq!(json["stop_reason"], "idle timeout 5s");
        assert_eq!(json["idle_timeout"], "5s");
        assert_eq!(json["max_duration"], "2h");
        let port =
            serde_json::json!([{"host_ip": "127.0.0.1", "host_port": 8080, "guest_port": 8000}]);
        assert_eq!(json["publish"], port);
        let list = crate::cmd::list::ListEntry::new(&vm);
        assert_eq!(serde_json::to_value(&list).unwrap()["publish"], port);
        assert_eq!(list.stop_reason.as_deref(), Some("idle timeout 5s"));
        let table = crate::cmd::list::table(&[list]);
        assert!(table.contains("stopped (idle timeout 5s)"), "{table}");
    }

    #[test]
    fn a_stopped_vm_without_status_and_unknown_names() {
        let home = tempfile::tempdir().unwrap();
        make_vm(home.path(), "dev", Some(&config("dev", false, None)), None);
        let ctx = ctx(home.path());
        let got = Inspect::new(&ctx.load("dev").unwrap());
        assert_eq!(got.state, VmState::Stopped);
        assert_eq!(got.accel.as_deref(), Some("auto"), "vm.json's, as asked");
        assert_eq!(got.image, None);
        assert_eq!(got.pids.capsem_process, None);
        assert!(got.pids.guest.is_empty());
        assert_eq!(got.last_shell_exit, None);
        assert_eq!(got.agent_connects, 0);
        assert_eq!(got.stop_reason, None);
        assert_eq!(got.idle_timeout, None);
        assert!(matches!(
            run(&ctx, "nope"),
            Err(CliError::NoSuchVm(n)) if n == "nope"
        ));
        assert!(matches!(run(&ctx, "../dev"), Err(CliError::Name { .. })));
    }

    /// Whether `a` and `b` have the same keys, recursively (arrays by
    /// their first elements; values themselves are not compared).
    fn same_shape(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
        use serde_json::Value;
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let kx: Vec<&String> = x.keys().collect();
                let ky: Vec<&String> = y.keys().collect();
                assert_eq!(kx, ky, "keys of {at}");
                for (k, v) in x {
                    same_shape(v, &y[k], &format!("{at}.{k}"));
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                if let (Some(x), Some(y)) = (x.first(), y.first()) {
                    same_shape(x, y, &format!("{at}[0]"));
                }
            }
            _ => {}
        }
    }

    #[test]
    fn docs_examples_have_exactly_the_fields() {
        let doc = include_str!("../../../docs/cli-json.md");
        let blocks: Vec<serde_json::Value> = doc
            .split("```json\n")
            .skip(1)
            .map(|b| serde_json::from_str(b.split("```").next().unwrap()).unwrap())
            .collect();
        // `list --json` and `inspect` come first; later sections add more.
        assert!(blocks.len() >= 2, "{} JSON examples", blocks.len());

        let home = tempfile::tempdir().unwrap();
        let mut process = Marked::spawn("capsem-process");
        let mut agent = Marked::spawn("qemu");
        let pids = Pids {
            process: process.record.clone(),
            guest: vec![agent.record.clone()],
            cid: None,
        };
        let mut with_image = config("dev", false, None);
        with_image.image = Some(VmImage {
            reference: "r".into(),
            digest: "sha256:00".into(),
        });
        let dir = make_vm(home.path(), "dev", Some(&with_image), Some(&pids));
        let disk = std::fs::File::create(dir.join(DISK_FILE)).unwrap();
        disk.set_len(64 << 20).unwrap();
        let status = VmStatusFile {
            last_shell_exit: Some(ShellExit {
                exit_code: Some(0),
                signal: None,
                at: "2026-01-02T04:00:00Z".into(),
            }),
            ..Default::default()
        };
        vmstate::write_json(&dir.join(STATUS_FILE), &status).unwrap();
        let vm = ctx(home.path()).load("dev").unwrap();

        let list = serde_json::to_value([crate::cmd::list::ListEntry::new(&vm)]).unwrap();
        same_shape(&blocks[0], &list, "list");
        let got = Inspect::new(&vm);
        let disk = got.disk.clone().unwrap();
        assert_eq!(disk.size_bytes, 64 << 20);
        assert!(disk.allocated_bytes < disk.size_bytes, "sparse: {disk:?}");
        let inspect = serde_json::to_value(got).unwrap();
        same_shape(&blocks[1], &inspect, "inspect");
        process.finish();
        agent.finish();
    }
}
