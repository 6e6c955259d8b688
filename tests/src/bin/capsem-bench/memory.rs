//! Resident memory of an idle VM's host processes: at the first prompt,
//! then every 10 s while the shell sits idle, so the figure after the boot
//! settles shows beside the one at the prompt; then again after the guest
//! touched and freed 256 MiB (what free page reporting returns to the host);
//! in a real VM, last, after the guest read about 150 MiB of files and sat
//! idle (the page cache capsem-init drops after 30 s of idle).

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use capsem_tests::procs::status_kib;
use capsem_tests::pty::PtySession;
use capsem_tests::scenarios::{step, wait_ready};
use capsem_tests::{Backend, Fixture};

/// How long the shell sits idle; samples every [`EVERY`].
const IDLE: Duration = Duration::from_secs(30);
const EVERY: Duration = Duration::from_secs(10);
/// After the files were read: capsem-init's 30 s of idle, its 10 s tick,
/// and free page reporting's own delay.
const READ_IDLE: Duration = Duration::from_secs(60);

/// Samples every [`EVERY`] for `how_long`, each labelled `{prefix}+Ns`.
fn idle_samples(prefix: &str, how_long: Duration) {
    let mut waited = Duration::ZERO;
    while waited < how_long {
        // Idle on purpose: this measures what an untouched VM settles to.
        std::thread::sleep(EVERY);
        waited += EVERY;
        sample(&format!("{prefix}+{}s", waited.as_secs()));
    }
}

/// `VmRSS` and its parts (`RssAnon`, `RssFile`, `RssShmem`), KiB.
fn rss_parts(pid: i32) -> Option<[u64; 4]> {
    let field = |key: &str| status_kib(pid, key);
    Some([
        field("VmRSS")?,
        field("RssAnon")?,
        field("RssFile")?,
        field("RssShmem")?,
    ])
}

/// Runs `line` at the prompt; it ends by printing `marker` (written so its
/// echo differs), then the prompt returns.
fn run_line(s: &mut PtySession, backend: Backend, line: &str, marker: &str) -> Result<()> {
    s.line(line)?;
    s.expect(marker, step(backend))?;
    s.expect_any(&["# ", "$ "], step(backend))?;
    Ok(())
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
    idle_samples("", IDLE);
    // Then memory the guest touched and freed again: a process writes
    // every page of 256 MiB and exits. With free page reporting the host's
    // share should fall back; without it those pages stay resident.
    run_line(
        &mut s,
        backend,
        "python3 -c 'b = bytearray(256 << 20); b[::4096] = b\"x\" * (len(b) // 4096)'; \
         echo FREED$((6*7))",
        "FREED42",
    )?;
    sample("after 256 MiB freed");
    idle_samples("freed ", IDLE);
    if backend == Backend::Qemu {
        // Files read and left in the guest's page cache, a build's worth:
        // the kernel keeps them while memory is plentiful.
        run_line(
            &mut s,
            backend,
            "cat /usr/bin/* /usr/lib/x86_64-linux-gnu/*.so* >/dev/null 2>&1; \
             echo READ$((6*7))",
            "READ42",
        )?;
        sample("after files read");
        idle_samples("read ", READ_IDLE);
    }
    s.line("exit")?;
    s.wait(step(backend))?;
    drop(s);
    fx.assert_nothing_left();
    Ok(())
}
