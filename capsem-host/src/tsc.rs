//! The host's TSC rate, which a TCG guest is told (`tsc_early_khz`) instead
//! of measuring it: under TCG its `rdtsc` reads the host's TSC, and a
//! microvm has no HPET or ACPI PM timer to calibrate against.

use std::path::Path;

/// From the host's own files.
pub fn host_tsc_khz() -> Option<u64> {
    tsc_khz_from(
        Path::new("/sys/devices/system/cpu/cpu0/tsc_freq_khz"),
        Path::new("/proc/cpuinfo"),
    )
}

/// The host's TSC rate in kHz: the kernel's own figure where it exports one,
/// else cpu0's `cpu MHz` (constant on the TSC-invariant CPUs QEMU needs).
pub fn tsc_khz_from(sys_tsc: &Path, cpuinfo: &Path) -> Option<u64> {
    if let Ok(text) = std::fs::read_to_string(sys_tsc) {
        if let Ok(khz) = text.trim().parse::<u64>() {
            return Some(khz);
        }
    }
    let info = std::fs::read_to_string(cpuinfo).ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then_some((mhz * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_rate_from_sysfs_else_cpuinfo() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("tsc_freq_khz");
        let info = d.path().join("cpuinfo");
        std::fs::write(&info, "processor\t: 0\ncpu MHz\t\t: 2599.998\n").unwrap();
        assert_eq!(tsc_khz_from(&sys, &info), Some(2_599_998));
        std::fs::write(&sys, "3000000\n").unwrap();
        assert_eq!(tsc_khz_from(&sys, &info), Some(3_000_000));
        assert_eq!(tsc_khz_from(&d.path().join("x"), &d.path().join("y")), None);
    }
}
