//! `capsem exec` on a persistent VM: its latency, its output over pipes,
//! and the same output on the guest's PTY (`exec -t`) beside pipes, with
//! the two figures that say where a PTY's line-by-line output is bound:
//! the same one-write-per-line output over pipes, and the guest's own PTY
//! read inside the guest (nothing leaving the VM).

use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use capsem_tests::{Backend, Fixture};

use crate::{drain, summarize};

/// `capsem exec NAME true` on a persistent VM, end to end (CLI start to
/// exit), then the command's output throughput to the CLI.
pub fn exec_bench(backend: Backend, runs: usize, mib: u64) -> Result<()> {
    let fx = Fixture::new("bench_exec", backend);
    let created = fx
        .capsem()
        .args(["create", "bench"])
        .stdin(Stdio::null())
        .output()?;
    if !created.status.success() {
        bail!(
            "create failed: {}",
            String::from_utf8_lossy(&created.stderr)
        );
    }
    let result = measure(&fx, backend, runs, mib);
    let rm = fx
        .capsem()
        .args(["rm", "--force", "bench"])
        .stdin(Stdio::null())
        .output()?;
    result?;
    if !rm.status.success() {
        bail!("rm failed: {}", String::from_utf8_lossy(&rm.stderr));
    }
    fx.assert_nothing_left();
    Ok(())
}

/// MB/s of `sh -c CMD`'s stdout through `capsem exec` (`-t`: on a PTY),
/// and the bytes it wrote.
fn rate(fx: &Fixture, tty: bool, cmd: &str) -> Result<(u64, f64)> {
    let mut c = fx.capsem();
    c.arg("exec");
    if tty {
        c.arg("-t");
    }
    let child = c
        .args(["bench", "--", "sh", "-c", cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let (got, secs) = drain(child)?;
    Ok((got, got as f64 / secs / 1e6))
}

/// MB/s of `cmd` on a PTY inside the guest, read there by `script` and
/// counted by `wc` (nothing leaves the VM but the count), timed in the guest.
fn rate_in_guest_pty(fx: &Fixture, cmd: &str) -> Result<f64> {
    let timed = format!(
        "a=$(date +%s%N); n=$(script -qc '{cmd}' /dev/null | wc -c); b=$(date +%s%N); \
         echo \"$n $(( (b - a) / 1000 ))\""
    );
    let out = fx
        .capsem()
        .args(["exec", "bench", "--", "sh", "-c", &timed])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("in-guest pty: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    match (it.next(), it.next()) {
        (Some(Ok(bytes)), Some(Ok(us))) if us > 0.0 => Ok(bytes / us),
        _ => Err(anyhow::anyhow!("in-guest pty printed {text:?}")).context("script or date"),
    }
}

fn measure(fx: &Fixture, backend: Backend, runs: usize, mib: u64) -> Result<()> {
    let vmm = backend.flag();
    let mut samples = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        let status = fx
            .capsem()
            .args(["exec", "bench", "--", "true"])
            .stdin(Stdio::null())
            .status()?;
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
        if !status.success() {
            bail!("exec true failed: {status}");
        }
    }
    summarize(&format!("exec true latency ({vmm})"), "ms", samples);
    let bytes = mib * 1024 * 1024;
    let zeros = format!("head -c {bytes} /dev/zero");
    let (got, pipes) = rate(fx, false, &zeros)?;
    if got != bytes {
        bail!("exec output: {got} of {bytes} bytes");
    }
    println!("exec output throughput ({vmm}): {got} bytes = {pipes:.1} MB/s");
    let (_, on_pty) = rate(fx, true, &zeros)?;
    println!(
        "exec zeros ({vmm}): pipes {pipes:.2} MB/s, pty (-t) {on_pty:.2} MB/s, ratio {:.2}",
        on_pty / pipes
    );
    // Line-wrapped base64: on a tty a program's stdout is line buffered,
    // one 77-byte write(2) per line; on pipes, large writes.
    let b64 = format!("head -c {} /dev/zero | base64", bytes / 4);
    let (_, pipes) = rate(fx, false, &b64)?;
    let (_, on_pty) = rate(fx, true, &b64)?;
    println!(
        "exec base64 lines ({vmm}): pipes {pipes:.2} MB/s, pty (-t) {on_pty:.2} MB/s, ratio {:.2}",
        on_pty / pipes
    );
    // The same one write per line over pipes: what the write size alone costs.
    let (_, line_pipes) = rate(fx, false, &b64.replace("base64", "stdbuf -oL base64"))?;
    let guest_pty = rate_in_guest_pty(fx, &b64)?;
    println!(
        "exec base64 lines ({vmm}): one write per line on pipes {line_pipes:.2} MB/s \
         ({:.2} of pipes); the guest's own pty read in the guest {guest_pty:.2} MB/s; \
         pty (-t) against it {:.2}",
        line_pipes / pipes,
        on_pty / guest_pty
    );
    Ok(())
}
