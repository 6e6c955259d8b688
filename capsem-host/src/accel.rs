//! Which accelerator QEMU may use on this host: KVM only where a real KVM
//! module (kvm_intel or kvm_amd) is loaded and /dev/kvm opens read-write,
//! else TCG. A /dev/kvm served by anything else (a PVM module, say) can hang
//! a stock kernel, so its presence alone is not enough. capsem-process
//! decides with this; `capsem doctor` explains the same decision.

use std::path::Path;

/// The modules that make /dev/kvm trustworthy.
pub const KVM_MODULES: [&str; 2] = ["kvm_intel", "kvm_amd"];

/// What auto picks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// QEMU's `-cpu` for this accelerator.
    ///
    /// Under TCG the guest is told its CPU lacks ERMS (fast `rep movsb` and
    /// `rep stosb`): TCG runs a `rep` string instruction one iteration at a
    /// time, so the guest kernel's and glibc's byte-wise copies and clears
    /// cost eight times the iterations of the `rep movsq` and vector loops
    /// they fall back to. In-guest pipes and `/dev/zero` reads run 2-2.5
    /// times faster without it (docs/benchmarks.md).
    pub fn cpu(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max,-erms",
        }
    }
}

/// The host's own paths.
pub fn probe_host() -> KvmFacts {
    probe(Path::new("/sys/module"), Path::new("/dev/kvm"))
}

/// The host facts the rule reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmFacts {
    /// The loaded ones among [`KVM_MODULES`].
    pub modules: Vec<&'static str>,
    /// `Ok` when `/dev/kvm` opens read-write, else why not.
    pub dev_kvm: Result<(), String>,
    /// The device path that was tried (for messages).
    pub dev_kvm_path: String,
}

/// Reads the facts from `sys_module` (normally `/sys/module`) and `dev_kvm`
/// (normally `/dev/kvm`).
pub fn probe(sys_module: &Path, dev_kvm: &Path) -> KvmFacts {
    let modules = KVM_MODULES
        .into_iter()
        .filter(|m| sys_module.join(m).is_dir())
        .collect();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev_kvm)
        .map(drop)
        .map_err(|e| e.to_string());
    KvmFacts {
        modules,
        dev_kvm: dev,
        dev_kvm_path: dev_kvm.display().to_string(),
    }
}

impl KvmFacts {
    /// What `--accel auto` picks.
    pub fn auto(&self) -> Accel {
        if !self.modules.is_empty() && self.dev_kvm.is_ok() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// Why, in one line: "kvm_intel loaded, /dev/kvm opens read-write".
    pub fn reason(&self) -> String {
        let modules = if self.modules.is_empty() {
            "no kvm_intel or kvm_amd module loaded".to_string()
        } else {
            format!("{} loaded", self.modules.join(" and "))
        };
        let dev = match &self.dev_kvm {
            // Something else (a PVM module, say) serves it.
            Ok(()) if self.modules.is_empty() => {
                format!("{} opens but is not trusted without one", self.dev_kvm_path)
            }
            Ok(()) => format!("{} opens read-write", self.dev_kvm_path),
            Err(e) => format!("{}: {e}", self.dev_kvm_path),
        };
        format!("{modules}, {dev}")
    }

    /// The command that makes KVM usable, `None` when it already is.
    pub fn fix(&self) -> Option<&'static str> {
        if self.modules.is_empty() {
            Some("sudo modprobe kvm_intel || sudo modprobe kvm_amd")
        } else if self.dev_kvm.is_err() {
            // Takes effect at the next login.
            Some("sudo usermod -aG kvm \"$(id -un)\"")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake `/sys/module` with `modules`, and a fake `/dev/kvm` (a plain
    /// file) when `dev` is true.
    fn fake(modules: &[&str], dev: bool) -> (tempfile::TempDir, KvmFacts) {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("module");
        std::fs::create_dir(&sys).unwrap();
        for m in modules {
            std::fs::create_dir(sys.join(m)).unwrap();
        }
        let kvm = d.path().join("kvm");
        if dev {
            std::fs::write(&kvm, b"").unwrap();
        }
        let facts = probe(&sys, &kvm);
        (d, facts)
    }

    #[test]
    fn auto_needs_a_real_kvm_module_and_an_openable_dev_kvm() {
        for (modules, dev, want) in [
            (&["kvm_intel"][..], true, Accel::Kvm),
            (&["kvm", "kvm_amd"][..], true, Accel::Kvm),
            // /dev/kvm from a PVM module: not trusted.
            (&["kvm", "kvm_pvm"][..], true, Accel::Tcg),
            (&["kvm_intel"][..], false, Accel::Tcg),
            (&[][..], false, Accel::Tcg),
        ] {
            let (_d, facts) = fake(modules, dev);
            assert_eq!(facts.auto(), want, "{modules:?} dev={dev}");
            assert_eq!(facts.fix().is_none(), want == Accel::Kvm);
        }
    }

    #[test]
    fn reasons_name_the_facts() {
        let (_d, f) = fake(&["kvm_intel"], true);
        assert!(
            f.reason().starts_with("kvm_intel loaded, "),
            "{}",
            f.reason()
        );
        assert!(
            f.reason().ends_with("kvm opens read-write"),
            "{}",
            f.reason()
        );
        let (_d, f) = fake(&["kvm_pvm"], false);
        assert!(
            f.reason()
                .starts_with("no kvm_intel or kvm_amd module loaded, "),
            "{}",
            f.reason()
        );
        assert!(f.reason().contains("No such file"), "{}", f.reason());
        assert_eq!(
            f.fix(),
            Some("sudo modprobe kvm_intel || sudo modprobe kvm_amd")
        );
        let (_d, f) = fake(&["kvm_pvm"], true);
        assert!(f.reason().ends_with("opens but is not trusted without one"));
        let (_d, f) = fake(&["kvm_amd"], false);
        assert!(f.fix().unwrap().contains("usermod -aG kvm"));
    }
}
