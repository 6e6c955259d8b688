//! `--accel auto|kvm|tcg` resolved with the rule in [`capsem_host::accel`]
//! (KVM only where kvm_intel or kvm_amd is loaded and /dev/kvm opens), the
//! same one `capsem doctor` explains.

use clap::ValueEnum;

pub use capsem_host::accel::{Accel, KvmFacts};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("--accel kvm, but KVM is not usable: {reason}")]
    KvmUnusable { reason: String },
}

/// Resolves the choice against the host's facts.
pub fn resolve(choice: AccelChoice, facts: &KvmFacts) -> Result<Accel, AccelError> {
    match (choice, facts.auto()) {
        (AccelChoice::Tcg, _) => Ok(Accel::Tcg),
        (AccelChoice::Auto, accel) => Ok(accel),
        (AccelChoice::Kvm, Accel::Kvm) => Ok(Accel::Kvm),
        (AccelChoice::Kvm, Accel::Tcg) => Err(AccelError::KvmUnusable {
            reason: facts.reason(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(modules: Vec<&'static str>, dev: bool) -> KvmFacts {
        KvmFacts {
            modules,
            dev_kvm: if dev { Ok(()) } else { Err("absent".into()) },
            dev_kvm_path: "/dev/kvm".into(),
        }
    }

    #[test]
    fn choices_against_facts() {
        let kvm = facts(vec!["kvm_intel"], true);
        let pvm = facts(vec![], true);
        assert_eq!(resolve(AccelChoice::Auto, &kvm).unwrap(), Accel::Kvm);
        assert_eq!(resolve(AccelChoice::Auto, &pvm).unwrap(), Accel::Tcg);
        assert_eq!(resolve(AccelChoice::Tcg, &kvm).unwrap(), Accel::Tcg);
        assert_eq!(resolve(AccelChoice::Kvm, &kvm).unwrap(), Accel::Kvm);
        let err = resolve(AccelChoice::Kvm, &pvm).unwrap_err().to_string();
        assert!(
            err.contains("no kvm_intel or kvm_amd module loaded"),
            "{err}"
        );
    }
}
