//! A persistent VM's lifetime limits (`create --idle-timeout`,
//! `--max-duration`), as `vm.json` records them, on capsem-process's command
//! line. They hold for an adopting capsem-process too (whose max duration
//! then counts from the adoption).

use std::ffi::OsString;

use capsem_host::vmstate::VmConfig;

/// `--idle-timeout-ms MS` and `--max-duration-ms MS`, for the limits set.
pub fn process_args(config: &VmConfig) -> Vec<OsString> {
    [
        ("--idle-timeout-ms", config.idle_timeout_ms),
        ("--max-duration-ms", config.max_duration_ms),
    ]
    .into_iter()
    .filter_map(|(flag, ms)| Some([flag.into(), ms?.to_string().into()]))
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{AccelChoice, Vmm};
    use crate::spawn::{Kind, Target};

    #[test]
    fn only_the_limits_that_are_set() {
        let mut c = crate::testutil::config("x", false, None);
        assert!(process_args(&c).is_empty());
        c.max_duration_ms = Some(60_000);
        assert_eq!(process_args(&c), ["--max-duration-ms", "60000"]);
        c.idle_timeout_ms = Some(5000);
        assert_eq!(
            process_args(&c),
            ["--idle-timeout-ms", "5000", "--max-duration-ms", "60000"]
        );
    }

    #[test]
    fn persistent_and_adopting_processes_get_them_temporary_ones_not() {
        let mut c = crate::testutil::config("x", false, None);
        c.idle_timeout_ms = Some(5000);
        let dir = std::path::Path::new("/h/vms/x");
        let args = |kind| {
            let t = Target {
                vm_dir: dir,
                vm_id: "x",
                vmm: Vmm::None,
                accel: AccelChoice::Auto,
                kind,
                config: &c,
                image: None,
                audit_log: None,
            };
            crate::spawn::process_args(&t, 7)
        };
        let flag = |a: &[OsString]| a.iter().any(|s| s == "--idle-timeout-ms");
        assert!(flag(&args(Kind::Persistent)));
        assert!(flag(&args(Kind::Adopt)));
        assert!(!flag(&args(Kind::Temporary { exec: false })));
    }
}
