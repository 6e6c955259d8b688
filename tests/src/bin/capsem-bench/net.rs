//! The egress relay (`--net`) against the host itself: connection setup
//! (curl's time to the first byte of a tiny response, n times) and the
//! download of a 256 MiB body, both from one loopback server of this
//! program (the network tests' `capsem_tests::net::Server`), measured by `curl -w` on the host and then in a persistent VM
//! (`capsem exec`). The VM reaches the server by a name that
//! `CAPSEM_NET_HOSTS` maps to 127.0.0.1; nothing else is dialled.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use capsem_tests::net::{capsem_with_hosts, Server};
use capsem_tests::persist::exec;
use capsem_tests::{Backend, Fixture};

use crate::summarize;

/// The download's size.
const BIG: u64 = 256 << 20;

/// curl's `-w` figures: (time to the first byte in s, download speed B/s).
fn parse_w(out: &[u8]) -> Result<Vec<(f64, f64)>> {
    let text = String::from_utf8_lossy(out);
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut it = l.split_whitespace().map(str::parse::<f64>);
            match (it.next(), it.next()) {
                (Some(Ok(t)), Some(Ok(s))) => Ok((t, s)),
                _ => bail!("unexpected curl output: {l:?}"),
            }
        })
        .collect()
}

/// One `sh -c` script that runs curl `n` times on `url`.
fn curl_loop(url: &str, n: usize) -> String {
    format!(
        "for i in $(seq {n}); do curl -sS -o /dev/null -w '%{{time_starttransfer}} %{{speed_download}}\\n' {url} || exit 1; done"
    )
}

fn report(label: &str, small: &[(f64, f64)], big: &[(f64, f64)]) {
    summarize(
        &format!("net setup {label} (first byte)"),
        "ms",
        small.iter().map(|(t, _)| t * 1000.0).collect(),
    );
    summarize(
        &format!("net download 256 MiB {label}"),
        "MB/s",
        big.iter().map(|(_, s)| s / 1e6).collect(),
    );
}

pub fn net(runs: usize) -> Result<()> {
    let server = Server::with_big(BIG);
    let p = server.port;
    let small = curl_loop(&format!("http://127.0.0.1:{p}/small"), runs);
    let big = curl_loop(&format!("http://127.0.0.1:{p}/big"), 3);
    let host = |script: &str| -> Result<Vec<(f64, f64)>> {
        let out = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!("host curl: {}", String::from_utf8_lossy(&out.stderr));
        }
        parse_w(&out.stdout)
    };
    let host_small = host(&small)?;
    let host_big = host(&big)?;

    let fx = Fixture::new("bench_net", Backend::Qemu);
    let hosts = fx.home().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 bench.capsem\n")?;
    let allow = format!("allow=bench.capsem:{p},127.0.0.1:{p}");
    let out = capsem_with_hosts(&fx, &hosts, &["create", "bench", "--net", &allow]).output()?;
    if !out.status.success() {
        bail!("create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let guest = |script: &str| -> Result<Vec<(f64, f64)>> {
        let out = exec(&fx, "bench", &["--", "sh", "-c", script], b"");
        if !out.status.success() {
            bail!("guest curl: {}", String::from_utf8_lossy(&out.stderr));
        }
        parse_w(&out.stdout).context("the guest's curl")
    };
    let relay = |s: &str| s.replace("127.0.0.1", "bench.capsem");
    let vm = guest(&relay(&small)).and_then(|s| Ok((s, guest(&relay(&big))?)));
    let rm = fx
        .capsem()
        .args(["rm", "--force", "bench"])
        .stdin(Stdio::null())
        .output();
    let (vm_small, vm_big) = vm?;
    rm?;
    fx.assert_nothing_left();
    report("host direct", &host_small, &host_big);
    report("guest via relay", &vm_small, &vm_big);
    let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        x[x.len() / 2]
    };
    println!(
        "net ratio guest/host: setup {:.1}x slower, download {:.3} of the host's speed",
        med(&vm_small, |x| x.0) / med(&host_small, |x| x.0),
        med(&vm_big, |x| x.1) / med(&host_big, |x| x.1),
    );
    Ok(())
}
