//! A VM's default resources and the disk size syntax, one rule for the CLI
//! (which records them in `vm.json`) and capsem-process (which boots with
//! them).

/// 2 vCPUs where the host has them.
pub fn default_cpus() -> u32 {
    let host = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    u32::try_from(host).unwrap_or(u32::MAX).clamp(1, 2)
}

/// 1 GiB where the host has at least twice that, else half of it (at least
/// 128 MiB).
pub fn default_memory_mib() -> u32 {
    let total_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| parse_mem_total_kib(&t))
        .map_or(u64::MAX, |kib| kib / 1024);
    u32::try_from((total_mib / 2).clamp(128, 1024)).unwrap_or(1024)
}

/// `MemTotal:  N kB` of /proc/meminfo.
pub fn parse_mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Smallest and largest writable disk: room for ext4's journal, and ext4's
/// limit with 4 KiB blocks.
pub const DISK_MIN: u64 = 64 << 20;
pub const DISK_MAX: u64 = 16 << 40;
/// The writable disk's size when none is asked for.
pub const DISK_DEFAULT: u64 = 8 << 30;

/// A disk size: `N`, `NK`, `NM`, `NG` or `NT` (powers of 1024; also
/// `NGiB`, `Ng`), within [`DISK_MIN`]..=[`DISK_MAX`].
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 8G, 512M or 1073741824"))?;
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if !(DISK_MIN..=DISK_MAX).contains(&bytes) {
        return Err(format!("{s:?} is outside 64M..16T"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_sizes() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("67108864"), Ok(64 << 20));
        for bad in ["", "G", "8X", "-1G", "1M", "17T", "99999999999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn host_memory_is_read_from_meminfo() {
        assert_eq!(
            parse_mem_total_kib("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24_576_000)
        );
        assert_eq!(parse_mem_total_kib("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn defaults_are_within_the_rule() {
        assert!((1..=2).contains(&default_cpus()));
        assert!((128..=1024).contains(&default_memory_mib()));
    }
}
