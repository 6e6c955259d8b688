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

/// The longest lifetime limit: a year.
pub const DURATION_MAX_MS: u64 = 365 * 86_400_000;

/// A lifetime limit: a whole number and a unit, `ms`, `s`, `m`, `h` or
/// `d` (`5s`, `10m`, `2h`), from 1 ms to [`DURATION_MAX_MS`]; milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration such as 30s, 10m or 2h");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (digits, unit) = t.split_at(split);
    let scale = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(bad()),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    match n.checked_mul(scale) {
        Some(ms) if (1..=DURATION_MAX_MS).contains(&ms) => Ok(ms),
        _ => Err(format!("{s:?} is outside 1ms..365d")),
    }
}

/// `ms` in the largest unit that states it exactly (`5s`, `90m`, `1500ms`).
pub fn format_duration_ms(ms: u64) -> String {
    for (unit, scale) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= scale && ms.is_multiple_of(scale) {
            return format!("{}{unit}", ms / scale);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("5s"), Ok(5000));
        assert_eq!(parse_duration_ms("10m"), Ok(600_000));
        assert_eq!(parse_duration_ms("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms("1d"), Ok(86_400_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        for bad in [
            "",
            "5",
            "s",
            "5x",
            "-5s",
            "5 s",
            "1.5h",
            "0s",
            "366d",
            "99999999999999999999s",
        ] {
            assert!(parse_duration_ms(bad).is_err(), "{bad:?} was accepted");
        }
        for (ms, text) in [
            (5000, "5s"),
            (600_000, "10m"),
            (5_400_000, "90m"),
            (1500, "1500ms"),
            (86_400_000, "1d"),
        ] {
            assert_eq!(format_duration_ms(ms), text);
            assert_eq!(parse_duration_ms(text), Ok(ms), "round trip of {text}");
        }
    }

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
