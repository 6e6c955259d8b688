//! `--net VALUE` (repeatable) and `--net-policy FILE` of a new VM: parsed
//! with `capsem_net` before anything boots (a malformed rule or file is one
//! line and exit 125) and turned into the canonical `--net` values that
//! `vm.json` records and capsem-process receives ([`capsem_net::Policy::to_args`]).

use capsem_net::Policy;

use crate::cli::{NewVmArgs, Vmm};

/// Why the network flags were refused.
#[derive(Debug, thiserror::Error)]
pub enum NetFlagError {
    #[error(transparent)]
    Value(#[from] capsem_net::policy::PolicyError),
    #[error(transparent)]
    File(#[from] capsem_net::file::FileError),
    #[error("--net {0}: cannot combine --net none with a --net-policy file that allows something")]
    NoneAndFile(String),
    #[error("--net {0} needs a VM: --vmm none runs the guest on this host and cannot enforce it")]
    NeedsVm(String),
}

/// The policy of `new`'s flags, as canonical `--net` values (empty: none).
pub fn resolve(new: &NewVmArgs, vmm: Vmm) -> Result<Vec<String>, NetFlagError> {
    let mut policy = Policy::from_args(&new.net)?;
    if let Some(path) = &new.net_policy {
        let file = capsem_net::file::load(path)?;
        if new.net.iter().any(|v| v.trim() == "none") && !file.is_none() {
            return Err(NetFlagError::NoneAndFile(file.describe()));
        }
        policy.open |= file.open;
        policy.rules.extend(file.rules);
    }
    if vmm == Vmm::None && !policy.is_none() {
        return Err(NetFlagError::NeedsVm(policy.describe()));
    }
    Ok(policy.to_args())
}

/// capsem-process's `--net V` for each of `vm.json`'s values, also when
/// adopting: the new capsem-process serves the guest's connections with
/// the VM's policy.
pub fn process_args(net: &[String]) -> impl Iterator<Item = std::ffi::OsString> + '_ {
    net.iter()
        .flat_map(|v| ["--net".into(), std::ffi::OsString::from(v)])
}

/// Whether any network flag was given (refused for an existing VM).
pub fn given(new: &NewVmArgs) -> bool {
    !new.net.is_empty() || new.net_policy.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(net: &[&str]) -> NewVmArgs {
        NewVmArgs {
            net: net.iter().map(|s| (*s).to_owned()).collect(),
            ..NewVmArgs::default()
        }
    }

    #[test]
    fn values_become_canonical_args() {
        assert!(resolve(&new(&[]), Vmm::Qemu).unwrap().is_empty());
        assert!(resolve(&new(&["none"]), Vmm::None).unwrap().is_empty());
        let args = resolve(
            &new(&["allow=A.example:80", "allow=127.0.0.1:8080"]),
            Vmm::Qemu,
        );
        assert_eq!(args.unwrap(), ["allow=a.example:80,127.0.0.1:8080"]);
    }

    #[test]
    fn each_value_is_one_flag() {
        let net = vec!["open".to_owned(), "allow=a.b".to_owned()];
        let args: Vec<_> = process_args(&net).collect();
        assert_eq!(args, ["--net", "open", "--net", "allow=a.b"]);
    }

    #[test]
    fn bad_values_and_vmm_none_are_refused() {
        assert!(matches!(
            resolve(&new(&["allow=bad..name"]), Vmm::Qemu),
            Err(NetFlagError::Value(_))
        ));
        assert!(matches!(
            resolve(&new(&["sometimes"]), Vmm::Qemu),
            Err(NetFlagError::Value(_))
        ));
        assert!(matches!(
            resolve(&new(&["open"]), Vmm::None),
            Err(NetFlagError::NeedsVm(_))
        ));
    }

    #[test]
    fn a_file_adds_its_rules() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(&path, "allow = [\"pypi.org:443\"]\n").unwrap();
        let mut args = new(&["allow=a.b"]);
        args.net_policy = Some(path.clone());
        assert_eq!(
            resolve(&args, Vmm::Qemu).unwrap(),
            ["allow=a.b,pypi.org:443"]
        );
        let mut none = new(&["none"]);
        none.net_policy = Some(path.clone());
        assert!(matches!(
            resolve(&none, Vmm::Qemu),
            Err(NetFlagError::NoneAndFile(_))
        ));
        std::fs::write(&path, "alow = []\n").unwrap();
        assert!(matches!(
            resolve(&args, Vmm::Qemu),
            Err(NetFlagError::File(_))
        ));
    }
}
