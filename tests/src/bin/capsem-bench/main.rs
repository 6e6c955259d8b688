//! Benchmarks that print figures: `cargo run --release -p capsem-tests --bin
//! capsem-bench -- [--vmm none|qemu] [exit|throughput|echo|memory|boot|run|exec|all]`,
//! or `-- flood [SECONDS]` (always a real VM, not part of `all`).
//!
//! [`boot`]: boot to the first prompt beside a bare QEMU, and `capsem run
//! -- true` stage by stage; [`memory`]: resident memory of an idle VM;
//! [`flood`]: host memory under a terminal flood, without and with a slow
//! client;
//! [`net`]: the egress relay against the host (always a real VM).
//!
//! Every figure in docs/benchmarks.md comes from this program; each section
//! there names the command line that reproduced it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capsem_tests::fixture::bin_dir;
use capsem_tests::scenarios::{step, wait_ready};
use capsem_tests::{Backend, Fixture};

mod boot;
mod exec;
mod flood;
mod memory;
mod net;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

pub(crate) fn summarize(name: &str, unit: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    println!(
        "{name}: n={} p50={:.3}{unit} p90={:.3}{unit} p99={:.3}{unit} min={:.3}{unit} max={:.3}{unit}",
        v.len(),
        percentile(&v, 0.5),
        percentile(&v, 0.9),
        percentile(&v, 0.99),
        v[0],
        v[v.len() - 1],
    );
}

/// From the shell's last output reaching the terminal to the CLI's exit,
/// which happens only after the VM is torn down and reaped.
fn exit_latency(backend: Backend, runs: usize) -> Result<()> {
    let mut samples = Vec::new();
    for _ in 0..runs {
        let fx = Fixture::new("bench_exit", backend);
        let mut s = fx.shell(80, 24);
        wait_ready(&mut s, backend);
        s.line("printf 'B''YE'; exit")?;
        s.expect("BYE", step(backend))?;
        let t0 = Instant::now();
        s.wait(step(backend))?;
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
        drop(s);
        fx.assert_nothing_left();
    }
    summarize(&format!("exit latency ({})", backend.flag()), "ms", samples);
    Ok(())
}

/// Reads `child`'s stdout to EOF, handing each chunk to `each`.
fn read_chunks(child: &mut std::process::Child, mut each: impl FnMut(&[u8])) -> Result<()> {
    let mut out = child.stdout.take().context("stdout")?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        each(&buf[..n]);
    }
}

/// Reads `child`'s stdout to EOF, counting bytes; returns (bytes, seconds).
pub(crate) fn drain(mut child: std::process::Child) -> Result<(u64, f64)> {
    let t0 = Instant::now();
    let mut total = 0u64;
    read_chunks(&mut child, |chunk| total += chunk.len() as u64)?;
    let secs = t0.elapsed().as_secs_f64();
    let status = child.wait()?;
    if !status.success() {
        bail!("command failed: {status}");
    }
    Ok((total, secs))
}

/// Reads `child`'s stdout to EOF and times each segment the guest marks
/// with `@@Sn@@` before and `@@En@@` after it (n from 1 to `segments`):
/// (bytes between the markers, seconds), with the boot left out.
fn marked(mut child: std::process::Child, segments: usize) -> Result<Vec<(u64, f64)>> {
    // The unread tail of the stream, searched for the next marker.
    let mut window: Vec<u8> = Vec::new();
    let mut found = Vec::new();
    let mut open: Option<(Instant, u64)> = None;
    let mut total = 0u64;
    read_chunks(&mut child, |chunk| {
        total += chunk.len() as u64;
        window.extend_from_slice(chunk);
        while found.len() < segments {
            let k = found.len() + 1;
            let marker = match open {
                None => format!("@@S{k}@@"),
                Some(_) => format!("@@E{k}@@"),
            };
            let Some(at) = window
                .windows(marker.len())
                .position(|w| w == marker.as_bytes())
            else {
                break;
            };
            // Bytes before the marker's end, counted from the stream's start.
            let pos = total - (window.len() - at - marker.len()) as u64;
            window.drain(..at + marker.len());
            match open.take() {
                None => open = Some((Instant::now(), pos)),
                Some((t0, p0)) => {
                    found.push((pos - p0 - marker.len() as u64, t0.elapsed().as_secs_f64()))
                }
            }
        }
        // Keep only what could still begin a marker.
        let keep = window.len().min(16);
        window.drain(..window.len() - keep);
    })?;
    let status = child.wait()?;
    if !status.success() || found.len() != segments {
        bail!(
            "shell ended with {status} after {} of {segments} segments",
            found.len()
        );
    }
    Ok(found)
}

/// Terminal output of a `capsem shell` (stdout a pipe), timed in the
/// guest's output between markers so the boot is left out: zeros (large
/// writes) and zeros through line-wrapped base64 (one write per line),
/// beside the host's own PTY for the second.
fn throughput(backend: Backend, mib: u64) -> Result<()> {
    // A plain byte count: the guest's busybox head takes no M suffix.
    let bytes = mib * 1024 * 1024;
    let b64 = format!("head -c {bytes} /dev/zero | base64");
    // Local PTY: `script` puts the command on a PTY and copies to its stdout.
    let local = Command::new("script")
        .args(["-qfc", &b64, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let (lb, ls) = drain(local)?;
    let fx = Fixture::new("bench_throughput", backend);
    let mut child = fx
        .capsem()
        .arg("shell")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    // The markers are split in the typed line, so that its echo (before
    // `stty -echo` runs) does not match.
    stdin.write_all(
        format!(
            "stty -echo; echo @@S''1@@; head -c {bytes} /dev/zero; echo @@E''1@@; \
             echo @@S''2@@; {b64}; echo @@E''2@@; exit\n"
        )
        .as_bytes(),
    )?;
    drop(stdin);
    let sampler = memory_sampler(&fx);
    let got = marked(child, 2)?;
    let peak = sampler.join().expect("sampler");
    fx.assert_nothing_left();
    let l_rate = lb as f64 / ls / 1e6;
    println!(
        "throughput local pty (script -qfc), base64: {lb} bytes in {ls:.2}s = {l_rate:.1} MB/s"
    );
    for ((b, secs), what) in got.into_iter().zip(["zeros", "base64"]) {
        let rate = b as f64 / secs / 1e6;
        println!(
            "throughput capsem shell ({}), {what}: {b} bytes in {secs:.2}s = {rate:.1} MB/s{}",
            backend.flag(),
            if what == "base64" {
                format!(", ratio to the local pty {:.2}", rate / l_rate)
            } else {
                String::new()
            }
        );
    }
    println!("rss during throughput: {peak}");
    Ok(())
}

/// Peak RSS of capsem-process and the agent while the fixture's VM lives.
fn memory_sampler(fx: &Fixture) -> std::thread::JoinHandle<String> {
    let home = fx.home().to_path_buf();
    std::thread::spawn(move || {
        let mut peak_process = 0u64;
        let mut peak_guest = 0u64;
        let deadline = Instant::now() + Duration::from_secs(600);
        // Wait for the VM to appear, then sample until its directory is gone.
        let mut seen = false;
        while Instant::now() < deadline {
            let vms = std::fs::read_dir(home.join("vms"))
                .map(|d| d.filter_map(|e| Some(e.ok()?.path())).collect::<Vec<_>>())
                .unwrap_or_default();
            if vms.is_empty() && seen {
                break;
            }
            for p in capsem_tests::procs::descendants() {
                let rss = capsem_tests::procs::status_kib(p.pid, "VmRSS").unwrap_or(0);
                let name = p.cmdline.first().cloned().unwrap_or_default();
                if name.ends_with("capsem-process") {
                    seen = true;
                    peak_process = peak_process.max(rss);
                } else if name.ends_with("capsem-agent")
                    || name.contains("qemu")
                    || name.contains("vhost-device-vsock")
                {
                    peak_guest = peak_guest.max(rss);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        format!("capsem-process peak {peak_process} KiB, guest side peak {peak_guest} KiB")
    })
}

/// Keystroke echo: one byte typed into the CLI's terminal until its echo
/// comes back through the whole path.
fn echo_rtt(backend: Backend, n: usize) -> Result<()> {
    let fx = Fixture::new("bench_echo", backend);
    let mut s = fx.shell(80, 24);
    wait_ready(&mut s, backend);
    // Keys typed while readline still has echo off would never echo: wait
    // for the marker printed after stty ran.
    s.line("stty -icanon; echo CAT$((1+1)); cat >/dev/null")?;
    s.expect("CAT2", step(backend))?;
    s.send("#")?;
    s.expect("#", step(backend))?;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let c = [b'a' + (i % 26) as u8];
        let text = std::str::from_utf8(&c)?.to_owned();
        let t0 = Instant::now();
        s.send(c)?;
        s.expect(&text, step(backend))?;
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    summarize(
        &format!("keystroke echo ({})", backend.flag()),
        "ms",
        samples,
    );
    s.send("\x03")?;
    // Ctrl-C flushes the tty's input queue: type nothing until the prompt
    // is back.
    s.expect_any(&["# ", "$ "], step(backend))?;
    wait_ready(&mut s, backend);
    s.line("exit")?;
    s.wait(step(backend))?;
    drop(s);
    fx.assert_nothing_left();
    Ok(())
}

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut backend = Backend::None;
    if let Some(i) = args.iter().position(|a| a == "--vmm") {
        backend = match args.get(i + 1).map(String::as_str) {
            Some("none") => Backend::None,
            Some("qemu") => Backend::Qemu,
            other => bail!("--vmm none|qemu, got {other:?}"),
        };
        args.drain(i..i + 2);
    }
    let what = args.first().cloned().unwrap_or_else(|| "all".into());
    eprintln!("binaries from {}", bin_dir().display());
    let all = what == "all";
    if all || what == "exit" {
        exit_latency(backend, if backend == Backend::None { 30 } else { 5 })?;
    }
    if all || what == "echo" {
        echo_rtt(backend, if backend == Backend::None { 1000 } else { 200 })?;
    }
    if all || what == "memory" {
        memory::idle(backend)?;
    }
    if (all && backend == Backend::Qemu) || what == "boot" {
        boot::boot(5)?;
    }
    if (all && backend == Backend::Qemu) || what == "run" {
        boot::run_true(backend, 5)?;
    }
    if all || what == "exec" {
        let (runs, mib) = if backend == Backend::None {
            (200, 256)
        } else {
            (50, 16)
        };
        exec::exec_bench(backend, runs, mib)?;
    }
    if (all && backend == Backend::Qemu) || what == "net" {
        net::net(20)?;
    }
    // Not in `all`: it takes twice its length (default 600 s a phase).
    if what == "flood" {
        let secs = match args.get(1) {
            Some(s) => s.parse().context("flood SECONDS")?,
            None => 600,
        };
        flood::flood(Duration::from_secs(secs))?;
    }
    if all || what == "throughput" {
        throughput(backend, if backend == Backend::None { 256 } else { 32 })?;
    }
    Ok(())
}
