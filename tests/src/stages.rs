//! Where a temporary VM's time went, from the logs it leaves behind
//! (`CAPSEM_LOG_DIR`): capsem-process's `process.log` and the guest console's
//! `serial.log`, both prefixed with the host's RFC 3339 wall-clock time.
//!
//! The kernel's own timestamps (`[    1.234567]`) run on the guest's clock
//! from the kernel's start; under TCG with `tsc_early_khz` that clock runs at
//! the host's rate, so the kernel's start on the host clock is a timestamped
//! line's host time less its guest time (the least over all lines: each
//! reached the host late by its own delay). Except early in the boot: until
//! the kernel's sched_clock is marked stable its timestamps are held to the
//! last timer tick, and they stood still for 250-300 ms of host time while
//! the boot CPU patched its text and started the second vCPU (a boot with
//! `loglevel=7`, docs/benchmarks.md). The lines a quiet boot prints all come
//! after that, so "kernel start" is that much late: the QEMU stage carries
//! the kernel's first 250-300 ms, which the kernel stage lacks; the sum of
//! the two holds. capsem-init's lines are
//! placed on that clock by their guest time too, which keeps the serial
//! line's buffering delay out of the init stages.

use std::time::SystemTime;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Host times (seconds since the epoch) of the points between stages.
#[derive(Debug, Clone, PartialEq)]
pub struct Points {
    pub qemu_spawned: f64,
    pub kernel_start: f64,
    pub init_first_line: f64,
    pub root_switched: f64,
    pub agent_hello: f64,
    pub exec_done: f64,
    pub teardown_done: f64,
}

/// Why the logs did not give every point.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StagesError {
    #[error("no line in {log} contains {what:?}")]
    Missing {
        log: &'static str,
        what: &'static str,
    },
    #[error("{log}: unreadable timestamp in {line:?}")]
    BadTime { log: &'static str, line: String },
}

/// Seconds since the epoch.
pub fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The host time a log line starts with.
fn host_time(log: &'static str, line: &str) -> Result<f64, StagesError> {
    let bad = || StagesError::BadTime {
        log,
        line: line.to_owned(),
    };
    let stamp = line.split_whitespace().next().ok_or_else(bad)?;
    let t = OffsetDateTime::parse(stamp, &Rfc3339).map_err(|_| bad())?;
    Ok(t.unix_timestamp_nanos() as f64 / 1e9)
}

/// The kernel timestamp (`[    1.234567]`) right after the host's, if any.
fn guest_time(line: &str) -> Option<f64> {
    let rest = line.split_once(' ')?.1.trim_start().strip_prefix('[')?;
    rest.split_once(']')?.0.trim().parse().ok()
}

fn find<'a>(text: &'a str, log: &'static str, what: &'static str) -> Result<&'a str, StagesError> {
    text.lines()
        .find(|l| l.contains(what))
        .ok_or(StagesError::Missing { log, what })
}

/// The points of one `capsem run`, from its `process.log` and `serial.log`.
pub fn parse(process_log: &str, serial_log: &str) -> Result<Points, StagesError> {
    let proc_at =
        |what: &'static str| host_time("process.log", find(process_log, "process.log", what)?);
    // Each line reaches the host after the guest printed it, so every line
    // bounds the kernel's start from above: the tightest bound is the line
    // that waited least.
    let mut kernel_start = f64::INFINITY;
    for (line, guest) in serial_log.lines().filter_map(|l| Some((l, guest_time(l)?))) {
        kernel_start = kernel_start.min(host_time("serial.log", line)? - guest);
    }
    if kernel_start.is_infinite() {
        return Err(StagesError::Missing {
            log: "serial.log",
            what: "[ kernel timestamp ]",
        });
    }
    let guest_at = |what: &'static str| -> Result<f64, StagesError> {
        let line = find(serial_log, "serial.log", what)?;
        let g = guest_time(line).ok_or_else(|| StagesError::BadTime {
            log: "serial.log",
            line: line.to_owned(),
        })?;
        Ok(kernel_start + g)
    };
    Ok(Points {
        qemu_spawned: proc_at("started qemu")?,
        kernel_start,
        init_first_line: guest_at("] capsem-init:")?,
        root_switched: guest_at("capsem-init: switched to the root filesystem")?,
        agent_hello: proc_at("guest connected")?,
        exec_done: proc_at("command exited")?,
        teardown_done: proc_at("teardown complete")?,
    })
}

/// Stage names and their lengths in milliseconds, from the CLI's start
/// (`started`) to its exit (`exited`), both host times.
pub fn breakdown(p: &Points, started: f64, exited: f64) -> Vec<(&'static str, f64)> {
    let marks = [
        ("capsem start -> qemu spawned", started, p.qemu_spawned),
        ("qemu -> kernel start", p.qemu_spawned, p.kernel_start),
        (
            "kernel -> capsem-init's first line",
            p.kernel_start,
            p.init_first_line,
        ),
        (
            "capsem-init -> root switched",
            p.init_first_line,
            p.root_switched,
        ),
        (
            "root switched -> agent hello",
            p.root_switched,
            p.agent_hello,
        ),
        ("agent hello -> command exited", p.agent_hello, p.exec_done),
        (
            "command exited -> CLI exit, VM gone",
            p.exec_done,
            exited.max(p.teardown_done),
        ),
    ];
    marks
        .iter()
        .map(|(name, a, b)| (*name, (b - a) * 1000.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Trimmed from a real run (release, TCG, this machine).
    const PROCESS: &str = "\
2026-12-02T05:51:14.029279698Z  INFO capsem-process 0.1.0 starting: vm_id=tmp-0448
2026-12-02T05:51:14.053918083Z  INFO vm tmp-0448: started qemu (pid 10103) accel=tcg
2026-12-02T05:51:16.223705813Z  INFO guest connected generation=1 agent_connects=1 shell_pid=0
2026-12-02T05:51:16.32072805Z  INFO command exited: exit_code=Some(0) signal=None
2026-12-02T05:51:16.436000304Z  INFO teardown complete
";
    const SERIAL: &str = "\
2026-12-02T05:51:14.880888674Z [    0.375890] PCI: Fatal: No config space access function found
2026-12-02T05:51:15.660213436Z [    1.136677] capsem-init: filesystems mounted
2026-12-02T05:51:16.145231366Z [    1.620708] capsem-init: switched to the root filesystem
2026-12-02T05:51:16.19933095Z 2026-12-02T05:51:16.36005375Z  INFO capsem_agent: agent starting
";

    #[test]
    fn points_from_real_logs() {
        let p = parse(PROCESS, SERIAL).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        let base = 1_796_190_600.0; // 2026-12-02T05:50:00Z
        assert!(close(p.qemu_spawned - base, 74.053918083), "{p:?}");
        // The mount and switch lines bound it 19 and 20 ms later: the first
        // line's bound is the tightest, until that line arrives late.
        assert!(close(p.kernel_start - base, 74.880888674 - 0.375890));
        let late_first = SERIAL.replace("14.880888674Z", "14.990888674Z");
        let p2 = parse(PROCESS, &late_first).unwrap();
        assert!(close(p2.kernel_start - base, 75.660213436 - 1.136677));
        assert!(close(p.init_first_line - p.kernel_start, 1.136677));
        assert!(close(p.root_switched - p.kernel_start, 1.620708));
        assert!(close(p.agent_hello - base, 76.223705813));
        assert!(close(p.exec_done - base, 76.32072805));
        assert!(close(p.teardown_done - base, 76.436000304));
        let stages = breakdown(&p, p.qemu_spawned - 0.1, p.teardown_done + 0.01);
        assert_eq!(stages.len(), 7);
        // Milliseconds, from seconds since the epoch: 1 µs is close enough.
        let near = |a: f64, b: f64| (a - b).abs() < 1e-3;
        assert!(near(stages[0].1, 100.0), "{stages:?}");
        assert!(near(stages[3].1, (1.620708 - 1.136677) * 1000.0));
        assert!(near(stages[6].1, (76.446000304 - 76.32072805) * 1000.0));
    }

    #[test]
    fn a_missing_stage_is_named() {
        let no_exec = PROCESS.replace("command exited", "something else");
        assert_eq!(
            parse(&no_exec, SERIAL),
            Err(StagesError::Missing {
                log: "process.log",
                what: "command exited"
            })
        );
        assert!(matches!(
            parse(PROCESS, "no timestamps here\n"),
            Err(StagesError::BadTime { .. }) | Err(StagesError::Missing { .. })
        ));
        assert!(matches!(
            parse(
                &PROCESS.replace("2026-12-02T05:51:14.05", "yesterday"),
                SERIAL
            ),
            Err(StagesError::BadTime {
                log: "process.log",
                ..
            })
        ));
    }
}
