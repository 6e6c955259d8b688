//! Page cache handed back while the guest is idle.
//!
//! Free page reporting (virtio-balloon) returns the pages the guest frees,
//! but the kernel does not free its page cache while memory is plentiful:
//! a VM that built a project and then sits idle keeps every file it read
//! resident on the host, a second copy of what the host's own page cache
//! holds for the disk images. PID 1 samples the guest every [`TICK`]; after
//! [`IDLE_TICKS`] samples in a row with the CPUs at most [`BUSY_MAX_PERMILLE`]
//! busy, and with at least [`MIN_CACHE_KIB`] of file pages cached, it drops
//! the clean page cache (`vm.drop_caches = 1`); free page reporting then
//! returns those pages to the host. The next read of a file comes from the
//! virtual disk, which the host serves from its own page cache.

use std::time::Duration;

/// How often the guest is sampled.
pub const TICK: Duration = Duration::from_secs(10);
/// Idle samples in a row before the cache is dropped (30 s).
pub const IDLE_TICKS: u32 = 3;
/// A sample is idle when the CPUs were busy at most this much of it (5%).
pub const BUSY_MAX_PERMILLE: u64 = 50;
/// File pages worth dropping: less is what any boot caches.
pub const MIN_CACHE_KIB: u64 = 32 * 1024;

const STAT: &str = "/proc/stat";
const MEMINFO: &str = "/proc/meminfo";
const DROP_CACHES: &str = "/proc/sys/vm/drop_caches";

/// The CPUs' time since boot, in clock ticks, from `/proc/stat`'s `cpu` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// idle + iowait.
    pub idle: u64,
    /// Every field of the line (guest time is already in user and nice).
    pub total: u64,
}

/// The `cpu` line of `/proc/stat` text.
pub fn parse_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    let total = fields.iter().take(8).sum();
    Some(CpuTimes { idle, total })
}

/// KiB of file pages on the LRU lists (`Active(file)` + `Inactive(file)`
/// in `/proc/meminfo`): the page cache, less shmem (the initramfs, tmpfs),
/// which dropping caches cannot free.
pub fn parse_file_cache_kib(text: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    Some(field("Active(file):")? + field("Inactive(file):")?)
}

/// The decision, fed one sample per [`TICK`].
#[derive(Debug, Default)]
pub struct IdleReclaim {
    last: Option<CpuTimes>,
    idle_ticks: u32,
}

impl IdleReclaim {
    /// Takes one sample; `true` when the cache should be dropped now.
    pub fn observe(&mut self, cpu: CpuTimes, file_cache_kib: u64) -> bool {
        let Some(last) = self.last.replace(cpu) else {
            return false;
        };
        let total = cpu.total.saturating_sub(last.total);
        let idle = cpu.idle.saturating_sub(last.idle).min(total);
        // No clock ticks at all (a stalled vCPU) says nothing either way.
        if total == 0 {
            return false;
        }
        if (total - idle) * 1000 > total * BUSY_MAX_PERMILLE {
            self.idle_ticks = 0;
            return false;
        }
        self.idle_ticks += 1;
        if self.idle_ticks >= IDLE_TICKS && file_cache_kib >= MIN_CACHE_KIB {
            // Another drop needs another full idle stretch.
            self.idle_ticks = 0;
            return true;
        }
        false
    }

    /// Samples the guest and drops the page cache when [`Self::observe`]
    /// says so. Failures are logged, never fatal: this only saves memory.
    pub fn tick(&mut self) {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        let (Some(cpu), Some(cached)) = (
            read(STAT).as_deref().and_then(parse_stat),
            read(MEMINFO).as_deref().and_then(parse_file_cache_kib),
        ) else {
            return;
        };
        if !self.observe(cpu, cached) {
            return;
        }
        match std::fs::write(DROP_CACHES, "1") {
            Ok(()) => crate::log!("idle: dropped the page cache ({} MiB)", cached / 1024),
            Err(e) => crate::log!("warning: cannot drop the page cache: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT_TEXT: &str = "cpu  1000 20 300 50000 80 0 7 0 0 0\n\
                             cpu0 500 10 150 25000 40 0 4 0 0 0\n\
                             intr 12345\n";

    #[test]
    fn stat_sums_the_cpu_line() {
        let t = parse_stat(STAT_TEXT).unwrap();
        assert_eq!(t.idle, 50080);
        assert_eq!(t.total, 1000 + 20 + 300 + 50000 + 80 + 7);
        assert_eq!(parse_stat("cpu0 1 2 3 4\n"), None, "only the all-CPU line");
        assert_eq!(parse_stat("cpu  1 x 3 4\n"), None);
        assert_eq!(parse_stat("cpu  1 2 3\n"), None, "no idle field");
    }

    #[test]
    fn file_cache_is_the_two_file_lru_lists() {
        let text = "MemTotal:  983628 kB\nCached:  182780 kB\nShmem:   12240 kB\n\
                    Active(file):  3328 kB\nInactive(file):  170844 kB\n";
        assert_eq!(parse_file_cache_kib(text), Some(174172));
        assert_eq!(parse_file_cache_kib("Active(file): 3 kB\n"), None);
    }

    fn cpu(idle: u64, total: u64) -> CpuTimes {
        CpuTimes { idle, total }
    }

    #[test]
    fn drops_after_three_idle_samples_with_enough_cache() {
        let mut r = IdleReclaim::default();
        assert!(
            !r.observe(cpu(0, 0), MIN_CACHE_KIB),
            "the first sample only sets the base"
        );
        let mut total = 0;
        let mut idle = 0;
        let mut step = |r: &mut IdleReclaim, busy: u64, cache: u64| {
            total += 1000;
            idle += 1000 - busy;
            r.observe(cpu(idle, total), cache)
        };
        assert!(!step(&mut r, 10, MIN_CACHE_KIB));
        assert!(!step(&mut r, 50, MIN_CACHE_KIB), "5% busy is still idle");
        assert!(
            step(&mut r, 0, MIN_CACHE_KIB),
            "the third idle sample drops"
        );
        assert!(
            !step(&mut r, 0, MIN_CACHE_KIB),
            "a drop starts a new stretch"
        );
        assert!(!step(&mut r, 0, MIN_CACHE_KIB));
        assert!(step(&mut r, 0, MIN_CACHE_KIB));
    }

    #[test]
    fn a_busy_sample_restarts_the_count() {
        let mut r = IdleReclaim::default();
        let mut total = 0;
        let mut idle = 0;
        let mut step = |r: &mut IdleReclaim, busy: u64| {
            total += 1000;
            idle += 1000 - busy;
            r.observe(cpu(idle, total), 10 * MIN_CACHE_KIB)
        };
        step(&mut r, 0);
        assert!(!step(&mut r, 0));
        assert!(!step(&mut r, 0));
        assert!(!step(&mut r, 51), "over 5% busy");
        assert!(!step(&mut r, 0));
        assert!(!step(&mut r, 0));
        assert!(step(&mut r, 0));
    }

    #[test]
    fn little_cache_or_no_clock_is_left_alone() {
        let mut r = IdleReclaim::default();
        for i in 0..=5 {
            assert!(!r.observe(cpu(i * 1000, i * 1000), MIN_CACHE_KIB - 1));
        }
        // The clock stood still: neither idle nor busy.
        assert!(!r.observe(cpu(5000, 5000), MIN_CACHE_KIB));
        // Idle all along: the first sample with enough cache drops it.
        assert!(r.observe(cpu(6000, 6000), MIN_CACHE_KIB));
    }
}
