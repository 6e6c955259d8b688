//! Boot figures: `capsem shell` to its first prompt beside a bare QEMU boot
//! of the same image, and `capsem run -- true` end to end with each stage's
//! share (from the logs the temporary VM leaves; `capsem_tests::stages`).

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context, Result};
use capsem_tests::scenarios::step;
use capsem_tests::stages::{self, epoch_secs};
use capsem_tests::{Backend, Fixture};

use crate::summarize;

/// The image the VMs boot: `$CAPSEM_IMAGE_DIR` as capsem reads it, else the
/// fixture's default.
fn image_dir() -> PathBuf {
    std::env::var_os("CAPSEM_IMAGE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(capsem_tests::fixture::default_image_dir)
}

/// A bare QEMU boot of the same kernel (vmlinux when the image has one, as
/// capsem-process chooses) and initramfs, with the same machine and
/// accelerator but no devices, until capsem-init's first console line;
/// QEMU is killed there.
fn bare_qemu_to_first_init_line(image: &Path) -> Result<f64> {
    // The same rate capsem-process gives its TCG guests.
    let khz = capsem_host::tsc::host_tsc_khz().context("host TSC rate")?;
    let kernel = Some(image.join("vmlinux"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| image.join("vmlinuz"));
    let t0 = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-M", "microvm", "-m", "512M", "-smp", "1"])
        .args(["-cpu", capsem_host::accel::Accel::Tcg.cpu()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(image.join("initramfs.cpio.gz"))
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 reboot=t cryptomgr.notests \
             initcall_blacklist=crypto_kdf108_init tsc_early_khz={khz} tsc=reliable capsem.token=x"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let found = loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break None;
        }
        seen.extend_from_slice(&buf[..n]);
        if capsem_tests::pty::find(&seen, b"capsem-init:").is_some() {
            break Some(t0.elapsed().as_secs_f64());
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    found.context("bare QEMU never printed an init line")
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

/// Boot to the first prompt of `capsem shell`, beside a bare QEMU boot to
/// its first init line, alternating so both see the same host load.
pub fn boot(runs: usize) -> Result<()> {
    let image = image_dir();
    let mut ours = Vec::new();
    let mut bare = Vec::new();
    for _ in 0..runs {
        bare.push(bare_qemu_to_first_init_line(&image)? * 1000.0);
        let fx = Fixture::new("bench_boot", Backend::Qemu);
        let t0 = Instant::now();
        let mut s = fx.shell(80, 24);
        s.expect_any(&["# ", "$ "], step(Backend::Qemu))?;
        ours.push(t0.elapsed().as_secs_f64() * 1000.0);
        s.line("exit")?;
        s.wait(step(Backend::Qemu))?;
        drop(s);
        fx.assert_nothing_left();
    }
    let (o, b) = (median(&ours), median(&bare));
    summarize("boot: capsem shell to first prompt (qemu)", "ms", ours);
    summarize("boot: bare qemu to first init line", "ms", bare);
    println!("boot overhead ratio (medians): {:.3}", o / b);
    Ok(())
}

/// `capsem run -- true` end to end, `runs` times, then the median of each
/// stage (QEMU start, kernel, init, agent hello, exec, teardown).
pub fn run_true(backend: Backend, runs: usize) -> Result<()> {
    if backend != Backend::Qemu {
        bail!("run: the stage breakdown needs --vmm qemu (a kernel and a console)");
    }
    let mut totals = Vec::new();
    let mut per_stage: Vec<(&'static str, Vec<f64>)> = Vec::new();
    for _ in 0..runs {
        let fx = Fixture::new("bench_run", backend);
        let started = SystemTime::now();
        let t0 = Instant::now();
        let status = fx
            .capsem()
            .args(["run", "--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        totals.push(t0.elapsed().as_secs_f64() * 1000.0);
        let exited = SystemTime::now();
        if !status.success() {
            bail!("capsem run -- true failed: {status}\n{}", fx.all_logs());
        }
        fx.assert_nothing_left();
        let logs = fx.kept_logs();
        let get = |name: &str| logs.get(name).map(String::as_str).unwrap_or("");
        let points = stages::parse(get("process.log"), get("serial.log"))?;
        let stages = stages::breakdown(&points, epoch_secs(started), epoch_secs(exited));
        if per_stage.is_empty() {
            per_stage = stages.iter().map(|(n, _)| (*n, Vec::new())).collect();
        }
        for ((_, samples), (_, ms)) in per_stage.iter_mut().zip(stages) {
            samples.push(ms);
        }
    }
    summarize("run: capsem run -- true, end to end (qemu)", "ms", totals);
    for (name, samples) in &per_stage {
        println!(
            "run stage {name}: p50={:.0}ms (min {:.0}, max {:.0})",
            median(samples),
            samples.iter().cloned().fold(f64::INFINITY, f64::min),
            samples.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        );
    }
    Ok(())
}
