//! Host memory under a sustained terminal flood (issue 10): a persistent
//! VM's shell writes as fast as its terminal takes it, first with no client
//! attached (the output goes to capsem-process's scrollback ring only),
//! then with a client that reads 4 KiB every 100 ms (about 40 KB/s, far
//! below the flood). Every 30 s the resident size of each of the VM's host
//! processes is printed with its shared part (`RssShmem`: the guest RAM
//! pages QEMU and vhost-device-vsock have touched in the one memfd, which
//! the host holds once, bounded by the guest's size); at the end of a
//! phase, each one's spread after its first minute, with and without that
//! part, against the 1 MiB.
//!
//! The guest counts what it wrote (`/tmp/flood.count`, rewritten every
//! second), so the rate of each phase is printed too.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsem_tests::persist::{self, DETACH};
use capsem_tests::procs::status_kib;
use capsem_tests::scenarios::{step, wait_ready};
use capsem_tests::{Backend, Fixture};

const NAME: &str = "flood";
const EVERY: Duration = Duration::from_secs(30);
/// The spread allowed after the first minute.
const FLAT_KIB: u64 = 1024;
const SETTLE: Duration = Duration::from_secs(60);

/// The flood: 4 KiB writes of text lines to the terminal, and the running
/// byte count in a file once a second.
const FLOOD: &str = "stty -echo; python3 -c '
import os, time
line = b\"capsem\" + b\" flood 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOP\\n\"
chunk = line * (4096 // len(line))
n, last = 0, 0.0
while True:
    n += os.write(1, chunk)
    now = time.monotonic()
    if now - last >= 1:
        last = now
        with open(\"/tmp/flood.tmp\", \"w\") as f:
            f.write(str(n))
        os.rename(\"/tmp/flood.tmp\", \"/tmp/flood.count\")
'";

/// `VmRSS` and its shared part `RssShmem` (for QEMU and the vhost-user
/// devices: guest RAM pages they mapped, one memfd counted in each), KiB.
#[derive(Clone, Copy)]
struct Rss {
    total: u64,
    shmem: u64,
}

impl Rss {
    /// What the process holds alone (anonymous and file pages).
    fn own(self) -> u64 {
        self.total - self.shmem.min(self.total)
    }
}

/// [`Rss`] of each of the VM's host processes, by name.
fn rss(pids: &[(String, i32)]) -> BTreeMap<String, Rss> {
    pids.iter()
        .filter_map(|(name, pid)| {
            let rss = Rss {
                total: status_kib(*pid, "VmRSS")?,
                shmem: status_kib(*pid, "RssShmem")?,
            };
            Some((name.clone(), rss))
        })
        .collect()
}

/// capsem-process and the guest's host processes, named by their program
/// (`comm` would be a thread's name).
fn vm_pids(fx: &Fixture) -> Vec<(String, i32)> {
    let mut pids = vec![persist::process_pid(fx, NAME)];
    pids.extend(persist::guest_pids(fx, NAME));
    pids.into_iter()
        .map(|pid| {
            let argv0 = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv0 = argv0.split(|b| *b == 0).next().unwrap_or_default();
            let name = std::path::Path::new(&*String::from_utf8_lossy(argv0))
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| pid.to_string());
            (name, pid)
        })
        .collect()
}

/// What the guest has written so far.
fn written(fx: &Fixture) -> Result<u64> {
    let out = persist::exec(fx, NAME, &["cat", "/tmp/flood.count"], b"");
    if !out.status.success() {
        bail!("reading the flood's count failed: {:?}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().context("the flood's count")
}

/// Samples every [`EVERY`] for `length`, printing each sample, then each
/// process's spread after [`SETTLE`].
fn phase(fx: &Fixture, what: &str, length: Duration, mut pace: impl FnMut()) -> Result<()> {
    let pids = vm_pids(fx);
    let before = written(fx)?;
    let t0 = Instant::now();
    let mut next = t0;
    // Per process, for VmRSS and for its own part: (first, last, min, max)
    // of the samples after the first minute.
    let mut settled: BTreeMap<String, [[u64; 4]; 2]> = BTreeMap::new();
    loop {
        let at = t0.elapsed();
        if Instant::now() >= next {
            let now = rss(&pids);
            let line: Vec<String> = now
                .iter()
                .map(|(n, r)| format!("{n} {} KiB (shmem {})", r.total, r.shmem))
                .collect();
            println!("flood ({what}) +{}s: {}", at.as_secs(), line.join(", "));
            if at >= SETTLE {
                for (name, r) in now {
                    let e = settled.entry(name).or_insert([[r.total; 4], [r.own(); 4]]);
                    for (range, kib) in e.iter_mut().zip([r.total, r.own()]) {
                        *range = [range[0], kib, range[2].min(kib), range[3].max(kib)];
                    }
                }
            }
            next += EVERY;
        }
        if at >= length {
            break;
        }
        pace();
    }
    let secs = t0.elapsed().as_secs_f64();
    let bytes = written(fx)?.saturating_sub(before);
    println!(
        "flood ({what}): the guest wrote {bytes} bytes in {secs:.0} s = {:.2} MB/s",
        bytes as f64 / secs / 1e6
    );
    for (name, ranges) in settled {
        for ([first, last, lo, hi], part) in ranges.into_iter().zip(["VmRSS", "without shmem"]) {
            let spread = hi - lo;
            let verdict = if spread <= FLAT_KIB {
                "flat"
            } else {
                "NOT FLAT"
            };
            let drift = last as i64 - first as i64;
            println!(
                "flood ({what}) after the first minute: {name} {part} {lo}..{hi} KiB, \
                 spread {spread} KiB ({verdict}, limit {FLAT_KIB} KiB), last - first {drift} KiB"
            );
        }
    }
    Ok(())
}

/// `capsem shell NAME` with its output (a pipe) read slowly by the caller;
/// its input is a PTY, whose master is returned: Ctrl-] written there
/// detaches it (a piped stdin would carry the key to the shell as typed).
fn slow_client(fx: &Fixture) -> Result<(Child, std::fs::File)> {
    let pty = nix::pty::openpty(None, None).context("openpty")?;
    let child = fx
        .capsem()
        .args(["shell", NAME])
        .stdin(Stdio::from(pty.slave))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((child, std::fs::File::from(pty.master)))
}

pub fn flood(length: Duration) -> Result<()> {
    let backend = Backend::Qemu;
    let fx = Fixture::new("bench_flood", backend);
    persist::ok(&fx, &["create", NAME]);
    let mut s = persist::attach(&fx, NAME);
    wait_ready(&mut s, backend);
    s.line(FLOOD)?;
    // (Split in the typed command, so that its echo does not match.)
    s.expect("capsem flood 0123456789", step(backend))?;
    s.send(DETACH)?;
    s.expect("detached from", step(backend))?;
    s.wait(step(backend))?;
    drop(s);
    // No client: the flood's only reader is capsem-process.
    phase(&fx, "no client", length, || {
        // The sampler's pace, not a wait for anything.
        std::thread::sleep(Duration::from_secs(1));
    })?;
    let (mut client, mut keys) = slow_client(&fx)?;
    let mut out = client.stdout.take().context("stdout")?;
    let mut buf = vec![0u8; 4096];
    let mut read = 0u64;
    let t0 = Instant::now();
    let slow = phase(&fx, "client reading 40 KB/s", length, || {
        if let Ok(n) = out.read(&mut buf) {
            read += n as u64;
        }
        std::thread::sleep(Duration::from_millis(100));
    });
    println!(
        "flood: the slow client read {read} bytes in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    // Detach the client and read what it still writes until its EOF, then
    // remove the VM, flood and all.
    keys.write_all(DETACH)?;
    let mut rest = Vec::new();
    out.read_to_end(&mut rest)?;
    let status = client.wait()?;
    println!("flood: the slow client detached and exited with {status}");
    persist::ok(&fx, &["rm", "--force", NAME]);
    fx.assert_nothing_left();
    slow
}
