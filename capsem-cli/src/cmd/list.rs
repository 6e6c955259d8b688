//! `capsem list [--json]`: every VM under `<home>/vms/`, sorted by name.
//!
//! The table has the columns `NAME STATE KIND CREATED` (KIND is
//! `persistent` or `temporary`; CREATED is `-` when unknown; STATE says
//! why a VM stopped itself: `stopped (idle timeout 5s)`). `--json`
//! prints one JSON array of [`ListEntry`] objects, whose shape is
//! documented in `docs/cli-json.md` and only grows. A VM directory that
//! cannot be read is reported with one warning line on stderr and left
//! out.

use serde::Serialize;

use crate::context::Ctx;
use crate::error::{one_line_chain, CliError};
use crate::exit::Exit;
use crate::output::write_stdout;
use crate::vms::{Vm, VmState};

/// One element of `capsem list --json`. Fields are only ever added.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListEntry {
    pub name: String,
    pub state: VmState,
    pub temporary: bool,
    /// RFC 3339, UTC; `null` when the VM has no `vm.json`.
    pub created: Option<String>,
    /// `qemu` or `none`; `null` when unknown.
    pub vmm: Option<String>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    /// Why a stopped VM stopped itself (`idle timeout 5s`, `max duration
    /// 2h`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<String>,
    /// The host directories shared with the guest (`-v`), in order.
    pub shares: Vec<capsem_host::share::Share>,
    /// The published ports (`-p`), in order.
    pub publish: Vec<capsem_host::publish::Publish>,
}

impl ListEntry {
    pub fn new(vm: &Vm) -> Self {
        let config = vm.config.as_ref();
        Self {
            name: vm.name.clone(),
            state: vm.state(),
            temporary: vm.temporary(),
            created: config.map(|c| c.created.clone()),
            vmm: config.map(|c| c.vmm.clone()),
            cpus: config.map(|c| c.cpus),
            memory_mib: config.map(|c| c.memory_mib),
            stop_reason: vm.stop_reason(),
            shares: config.map(|c| c.shares.clone()).unwrap_or_default(),
            publish: config.map(|c| c.publish.clone()).unwrap_or_default(),
        }
    }

    fn kind(&self) -> &'static str {
        if self.temporary {
            "temporary"
        } else {
            "persistent"
        }
    }
}

/// Prints the VMs; exit code 0.
pub fn run(ctx: &Ctx, json: bool) -> Result<Exit, CliError> {
    let (vms, errors) = crate::vms::list(&ctx.home);
    for e in errors {
        eprintln!("capsem: warning: skipping a VM: {}", one_line_chain(&e));
    }
    let mut entries: Vec<ListEntry> = vms.iter().map(ListEntry::new).collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let text = if json {
        to_json(&entries)
    } else {
        table(&entries)
    };
    write_stdout(text.as_bytes())?;
    Ok(Exit::OK)
}

/// The `--json` text: a pretty array and a newline.
pub fn to_json(entries: &[ListEntry]) -> String {
    // Serializing plain strings, numbers and enums cannot fail.
    let mut text = serde_json::to_string_pretty(entries).unwrap_or_else(|_| "[]".into());
    text.push('\n');
    text
}

/// The table: a header and one line per VM, columns padded to the widest
/// cell (the last column is not padded).
pub fn table(entries: &[ListEntry]) -> String {
    let mut rows: Vec<[String; 4]> = vec![[
        "NAME".into(),
        "STATE".into(),
        "KIND".into(),
        "CREATED".into(),
    ]];
    for e in entries {
        rows.push([
            e.name.clone(),
            match &e.stop_reason {
                Some(r) => format!("{} ({r})", e.state),
                None => e.state.to_string(),
            },
            e.kind().into(),
            e.created.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    crate::output::columns(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{config, make_vm, Marked};
    use capsem_host::vmstate::Pids;

    #[test]
    fn entries_table_and_json() {
        let home = tempfile::tempdir().unwrap();
        make_vm(home.path(), "web", Some(&config("web", false, None)), None);
        let mut process = Marked::spawn("capsem-process");
        let pids = Pids {
            process: process.record.clone(),
            guest: vec![],
            cid: None,
        };
        let id = "tmp-0123456789abcdef";
        make_vm(home.path(), id, Some(&config(id, true, None)), Some(&pids));
        make_vm(home.path(), "db", Some(&config("db", false, None)), None);
        make_vm(home.path(), "tmp-00000000000000aa", None, None);

        let (vms, errors) = crate::vms::list(home.path());
        assert!(errors.is_empty());
        let mut entries: Vec<ListEntry> = vms.iter().map(ListEntry::new).collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            table(&entries),
            "\
NAME                  STATE    KIND        CREATED
db                    stopped  persistent  2026-01-02T03:04:05Z
tmp-00000000000000aa  stopped  temporary   -
tmp-0123456789abcdef  running  temporary   2026-01-02T03:04:05Z
web                   stopped  persistent  2026-01-02T03:04:05Z
"
        );
        let json: serde_json::Value = serde_json::from_str(&to_json(&entries)).unwrap();
        assert_eq!(
            json[2],
            serde_json::json!({
                "name": id,
                "state": "running",
                "temporary": true,
                "created": "2026-01-02T03:04:05Z",
                "vmm": "none",
                "cpus": 2,
                "memory_mib": 1024,
                "shares": [],
                "publish": [],
            })
        );
        assert_eq!(
            json[1],
            serde_json::json!({
                "name": "tmp-00000000000000aa",
                "state": "stopped",
                "temporary": true,
                "created": null,
                "vmm": null,
                "cpus": null,
                "memory_mib": null,
                "shares": [],
                "publish": [],
            })
        );
        assert_eq!(json.as_array().unwrap().len(), 4);
        process.finish();
    }

    #[test]
    fn empty_home() {
        let home = tempfile::tempdir().unwrap();
        let (vms, _) = crate::vms::list(home.path());
        assert!(vms.is_empty());
        assert_eq!(table(&[]), "NAME  STATE  KIND  CREATED\n");
        assert_eq!(to_json(&[]), "[]\n");
    }
}
