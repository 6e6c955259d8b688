//! Choosing the accelerator: KVM only where a real KVM module is loaded and
//! `/dev/kvm` opens; otherwise TCG. A `/dev/kvm` served by anything else
//! (a PVM module, say) can hang a stock kernel, so its presence alone is not
//! enough.

use std::path::Path;

use clap::ValueEnum;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// What QEMU will run with.
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

    /// `-cpu` for this accelerator.
    pub fn cpu(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("--accel kvm: no kvm_intel or kvm_amd module is loaded")]
    NoKvmModule,
    #[error("--accel kvm: cannot open /dev/kvm")]
    DevKvm(#[source] std::io::Error),
}

/// Where the host's facts are read from (a test points it elsewhere).
#[derive(Debug, Clone, Copy)]
pub struct Host<'a> {
    pub sys_module: &'a Path,
    pub dev_kvm: &'a Path,
}

impl Default for Host<'static> {
    fn default() -> Self {
        Self {
            sys_module: Path::new("/sys/module"),
            dev_kvm: Path::new("/dev/kvm"),
        }
    }
}

impl Host<'_> {
    fn kvm_module_loaded(&self) -> bool {
        ["kvm_intel", "kvm_amd"]
            .iter()
            .any(|m| self.sys_module.join(m).is_dir())
    }

    fn open_kvm(&self) -> std::io::Result<()> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.dev_kvm)
            .map(drop)
    }
}

/// Resolves the choice on this host.
pub fn resolve(choice: AccelChoice, host: Host<'_>) -> Result<Accel, AccelError> {
    match choice {
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm => {
            if !host.kvm_module_loaded() {
                return Err(AccelError::NoKvmModule);
            }
            host.open_kvm().map_err(AccelError::DevKvm)?;
            Ok(Accel::Kvm)
        }
        AccelChoice::Auto => {
            if host.kvm_module_loaded() && host.open_kvm().is_ok() {
                Ok(Accel::Kvm)
            } else {
                Ok(Accel::Tcg)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(modules: &[&str], kvm_file: bool) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("module")).unwrap();
        for m in modules {
            std::fs::create_dir(d.path().join("module").join(m)).unwrap();
        }
        if kvm_file {
            std::fs::write(d.path().join("kvm"), b"").unwrap();
        }
        d
    }

    fn host(d: &tempfile::TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
        (d.path().join("module"), d.path().join("kvm"))
    }

    #[test]
    fn auto_needs_a_real_kvm_module_and_an_openable_dev_kvm() {
        for (modules, file, want) in [
            (&["kvm_intel"][..], true, Accel::Kvm),
            (&["kvm_amd"][..], true, Accel::Kvm),
            // A /dev/kvm without kvm_intel/kvm_amd (this machine's PVM case).
            (&["kvm", "kvm_pvm"][..], true, Accel::Tcg),
            (&["kvm_intel"][..], false, Accel::Tcg),
        ] {
            let d = fake(modules, file);
            let (m, k) = host(&d);
            let got = resolve(
                AccelChoice::Auto,
                Host {
                    sys_module: &m,
                    dev_kvm: &k,
                },
            )
            .unwrap();
            assert_eq!(got, want, "{modules:?} file={file}");
        }
    }

    #[test]
    fn explicit_choices() {
        let d = fake(&[], true);
        let (m, k) = host(&d);
        let h = Host {
            sys_module: &m,
            dev_kvm: &k,
        };
        assert_eq!(resolve(AccelChoice::Tcg, h).unwrap(), Accel::Tcg);
        assert!(matches!(
            resolve(AccelChoice::Kvm, h),
            Err(AccelError::NoKvmModule)
        ));
    }
}
