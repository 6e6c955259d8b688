//! Resident memory of an idle VM's host processes: at the first prompt,
//! then every 10 s while the shell sits idle, so the figure after the boot
//! settles (freed guest pages returned to the host by free page reporting)
//! shows beside the one at the prompt.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use capsem_tests::scenarios::{step, wait_ready};
use capsem_tests::{Backend, Fixture};

/// How long the shell sits idle; samples every [`EVERY`].
const IDLE: Duration = Duration::from_secs(30);
const EVERY: Duration = Duration::from_secs(10);

/// `VmRSS` and its parts (`RssAnon`, `RssFile`, `RssShmem`), KiB.
fn rss_parts(pid: i32) -> Option<[u64; 4]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some([
        field("VmRSS:")?,
        field("RssAnon:")?,
        field("RssFile:")?,
        field("RssShmem:")?,
    ])
}

fn sample(when: &str) {
    for p in capsem_tests::procs::descendants() {
        let name = p.cmdline.first().cloned().unwrap_or_default();
        let Some(short) = Path::new(&name)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
        else {
            continue;
        };
        if !(short.starts_with("capsem-") || short.contains("qemu") || short.contains("vhost")) {
            continue;
        }
        if let Some([rss, anon, file, shmem]) = rss_parts(p.pid) {
            println!(
                "idle rss {when} {short}: {rss} KiB (anon {anon}, file {file}, shmem {shmem})"
            );
        }
    }
}

pub fn idle(backend: Backend) -> Result<()> {
    let fx = Fixture::new("bench_memory", backend);
    let mut s = fx.shell(80, 24);
    wait_ready(&mut s, backend);
    sample("at prompt");
    let mut waited = Duration::ZERO;
    while waited < IDLE {
        // Idle on purpose: this measures what an untouched VM settles to.
        std::thread::sleep(EVERY);
        waited += EVERY;
        sample(&format!("+{}s", waited.as_secs()));
    }
    s.line("exit")?;
    s.wait(step(backend))?;
    drop(s);
    fx.assert_nothing_left();
    Ok(())
}
