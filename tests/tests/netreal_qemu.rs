//! Real work through the egress relay, in real VMs: TLS with a certificate
//! the test makes (its CA copied into the guest and trusted there), `git
//! clone` over git's smart HTTP, and `pip download`/`pip install` from a
//! PEP 503 index; then what must still be refused, and `--audit-log` for a
//! temporary VM's network records (a datagram dropped as its last act
//! among them). Every server is a `tests/servers/
//! serve.py` child of this test on 127.0.0.1, reached through names that
//! `CAPSEM_NET_HOSTS` maps to 127.0.0.1. The one address literal the guest
//! dials that no rule names is 192.0.2.1 (TEST-NET-1, documentation only),
//! which the policy refuses twice over (no rule, and a reserved range)
//! before any dial. Names mapped to private and metadata addresses are
//! refused under `--net open` with capsem in a network namespace of the
//! test's own, where only loopback exists. `CAPSEM_SKIP_VM_TESTS=1
//! scripts/test.sh` leaves them out.
#![allow(clippy::unwrap_used)]

use std::process::Stdio;

use capsem_tests::net::{capsem_with_hosts, jsonl, records};
use capsem_tests::netserve::{bare_repo, PyServer, TestCa};
use capsem_tests::persist::{exec, ok, vm_dir};
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::Qemu;
/// curl's "operation timed out": a refusal must never look like this.
const CURL_TIMEOUT: i32 = 28;

/// `capsem exec NAME -- sh -c SCRIPT`: (exit code, stdout, stderr).
fn sh(fx: &Fixture, name: &str, script: &str) -> (Option<i32>, String, String) {
    let out = exec(fx, name, &["--", "sh", "-c", script], b"");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tls_git_and_pip_work_through_the_relay() {
    let fx = Fixture::new("netreal_vm", B);
    let work = fx.home().join("servers");
    let ca = TestCa::make(&work.join("ca"), "tls.capsem");
    let www = work.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "over tls, verified\n").unwrap();
    let tls = PyServer::start("tls", &[&www, &ca.cert, &ca.key]);
    let repos = work.join("git");
    std::fs::create_dir_all(&repos).unwrap();
    let head = bare_repo(&repos, "demo", "README", "cloned through capsem\n");
    let git = PyServer::start("git", &[&repos]);
    let index = work.join("pypi");
    std::fs::create_dir_all(&index).unwrap();
    let pypi = PyServer::start("pypi", &[&index]);

    let hosts = fx.home().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 tls.capsem git.capsem pypi.capsem\n").unwrap();
    let (t, g, p) = (tls.port, git.port, pypi.port);
    let allow = [
        format!("allow=tls.capsem:{t},127.0.0.1:{t}"),
        format!("allow=git.capsem:{g},127.0.0.1:{g}"),
        format!("allow=pypi.capsem:{p},127.0.0.1:{p}"),
    ];
    let mut args = vec!["create", "real"];
    for a in &allow {
        args.extend(["--net", a]);
    }
    let out = capsem_with_hosts(&fx, &hosts, &args).output().unwrap();
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // TLS: untrusted without the test's CA (curl's 60: the certificate was
    // checked, so the handshake really reached the server), then trusted.
    let url = format!("https://tls.capsem:{t}/");
    let (code, _, err) = sh(&fx, "real", &format!("curl -sS --max-time 20 {url}"));
    assert_eq!(
        code,
        Some(60),
        "an unknown CA must fail verification: {err}"
    );
    // Trusted system-wide: added to the bundle curl, git and pip read
    // (what update-ca-certificates writes; that takes minutes under TCG).
    ok(
        &fx,
        &[
            "cp",
            ca.ca.to_str().unwrap(),
            "real:/root/capsem-test-ca.pem",
        ],
    );
    let trust = "cat /root/capsem-test-ca.pem >> /etc/ssl/certs/ca-certificates.crt";
    let (code, _, err) = sh(&fx, "real", trust);
    assert_eq!(code, Some(0), "trusting the test CA: {err}");
    let (code, body, err) = sh(&fx, "real", &format!("curl -sS --max-time 20 {url}"));
    assert_eq!(code, Some(0), "curl over TLS: {err}");
    assert_eq!(body, "over tls, verified\n");

    // git clone over smart HTTP: the commit and its file.
    let clone = format!(
        "git clone -q http://git.capsem:{g}/demo.git /root/demo && git -C /root/demo rev-parse HEAD && cat /root/demo/README"
    );
    let (code, out, err) = sh(&fx, "real", &clone);
    assert_eq!(code, Some(0), "git clone: {err}");
    assert_eq!(out, format!("{head}\ncloned through capsem\n"));

    // pip: download the wheel, then install it and import it (plain HTTP
    // needs --trusted-host for a name other than localhost).
    let idx = format!(
        "--disable-pip-version-check --no-deps --trusted-host pypi.capsem --index-url http://pypi.capsem:{p}/simple/"
    );
    let pip = format!(
        "python3 -m pip download -q {idx} -d /root/dl capsemdemo && ls /root/dl && \
         python3 -m pip install -q --break-system-packages --root-user-action=ignore {idx} capsemdemo && \
         python3 -c 'import capsemdemo; print(capsemdemo.ANSWER)'"
    );
    let (code, out, err) = sh(&fx, "real", &pip);
    assert_eq!(code, Some(0), "pip: {err}");
    assert_eq!(out, "capsemdemo-1.0-py3-none-any.whl\n42\n");

    // Refused, each at once (a refusal, never curl's timeout), each recorded:
    // an address literal no rule names, and the TLS name on the git port.
    let (code, _, _) = sh(&fx, "real", "curl -sS --max-time 10 http://192.0.2.1:80/");
    assert!(
        code != Some(0) && code != Some(CURL_TIMEOUT),
        "literal: {code:?}"
    );
    let wrong = format!("curl -sS --max-time 10 https://tls.capsem:{g}/");
    let (code, _, _) = sh(&fx, "real", &wrong);
    assert!(
        code != Some(0) && code != Some(CURL_TIMEOUT),
        "other port: {code:?}"
    );

    let dir = vm_dir(&fx, "real");
    capsem_tests::fixture::wait_until(
        std::time::Duration::from_secs(60),
        "the deny records",
        || {
            records(&dir)
                .iter()
                .filter(|r| r["verdict"] == "deny")
                .count()
                >= 2
        },
    );
    let recs = records(&dir);
    assert!(
        recs.iter().any(|r| r["verdict"] == "deny"
            && r["guest_ip"] == "192.0.2.1"
            && r["address"].is_null()),
        "the literal's deny record, with nothing dialled: {recs:?}"
    );
    assert!(
        recs.iter()
            .any(|r| r["verdict"] == "deny" && r["name"] == "tls.capsem" && r["port"] == g),
        "{recs:?}"
    );
    for (name, port) in [("tls.capsem", t), ("git.capsem", g), ("pypi.capsem", p)] {
        assert!(
            recs.iter()
                .any(|r| r["verdict"] == "allow" && r["name"] == name && r["port"] == port),
            "no allow record for {name}: {recs:?}"
        );
    }
    ok(&fx, &["rm", "--force", "real"]);
    drop((tls, git, pypi));
    fx.assert_nothing_left();
}

#[test]
fn open_refuses_loopback_and_audit_log_keeps_the_records() {
    let fx = Fixture::new("netopen_vm", B);
    let www = fx.home().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "served only to an address rule\n").unwrap();
    let server = PyServer::start("static", &[&www]);
    let hosts = fx.home().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 loop.capsem\n").unwrap();
    let log = fx.home().join("audit-log.jsonl");
    let url = format!("http://loop.capsem:{}/", server.port);
    // `open` allows the name, but it resolves to loopback: refused. Then
    // a UDP datagram, dropped in the guest, as the command's last act: its
    // record still reaches the log.
    let script = format!(
        "curl -sS --max-time 10 {url}; rc=$?; echo x 2>/dev/null >/dev/udp/192.0.2.1/9; exit $rc"
    );
    let out = capsem_with_hosts(
        &fx,
        &hosts,
        &[
            "run",
            "--net",
            "open",
            "--audit-log",
            log.to_str().unwrap(),
            "--",
            "bash",
            "-c",
            &script,
        ],
    )
    .output()
    .unwrap();
    let code = out.status.code();
    assert!(
        code != Some(0) && code != Some(CURL_TIMEOUT),
        "loopback under open: {code:?}"
    );
    let recs = jsonl(&log);
    let exec = recs.iter().filter(|r| r.get("serial").is_some()).count();
    assert!(exec > 0, "the exec records come first: {recs:?}");
    let net: Vec<_> = recs.iter().filter(|r| r.get("kind").is_some()).collect();
    assert!(
        net.iter().any(|r| r["kind"] == "connect"
            && r["name"] == "loop.capsem"
            && r["verdict"] == "deny"
            && r["address"].is_null()),
        "the loopback refusal, nothing dialled: {recs:?}"
    );
    assert!(
        net.iter().any(|r| r["kind"] == "packet"
            && r["proto"] == "udp"
            && r["guest_ip"] == "192.0.2.1"
            && r["port"] == 9),
        "the last command's dropped datagram: {recs:?}"
    );
    let first_net = recs.iter().position(|r| r.get("kind").is_some()).unwrap();
    assert!(
        recs[first_net..].iter().all(|r| r.get("kind").is_some()),
        "{recs:?}"
    );
    // A policy naming the address lets it through: the refusal above was
    // the range, not a broken relay.
    let allow = format!("allow=loop.capsem:{p},127.0.0.1:{p}", p = server.port);
    let out = capsem_with_hosts(
        &fx,
        &hosts,
        &[
            "run",
            "--net",
            &allow,
            "--",
            "curl",
            "-sS",
            "--max-time",
            "20",
            &url,
        ],
    )
    .output()
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "served only to an address rule\n"
    );
    drop(server);
    fx.assert_nothing_left();
}

/// `--net open` refuses private, link-local and cloud-metadata addresses
/// that a name resolves to, before any dial. capsem runs in a network
/// namespace of this test's own with only loopback up (`unshare --net`),
/// so even a wrong dial could reach nothing outside it.
#[test]
fn open_refuses_private_and_metadata_addresses() {
    let fx = Fixture::new("netopen_private_vm", B);
    let hosts = fx.home().join("hosts");
    let mapped = [
        ("ten.capsem", "10.20.30.40", "private"),
        ("home.capsem", "192.168.77.1", "private"),
        ("meta.capsem", "169.254.169.254", "cloud metadata"),
    ];
    let lines: String = mapped
        .iter()
        .map(|(name, ip, _)| format!("{ip} {name}\n"))
        .collect();
    std::fs::write(&hosts, lines).unwrap();
    let log = fx.home().join("audit-log.jsonl");
    let script = "for h in ten home meta; do curl -sS --max-time 10 http://$h.capsem:8080/ 2>/dev/null; echo $h=$?; done";
    let args = [
        "run",
        "--net",
        "open",
        "--audit-log",
        log.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        script,
    ];
    let capsem = capsem_with_hosts(&fx, &hosts, &args);
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up && exec \"$@\"",
        "sh",
    ])
    .arg(capsem.get_program())
    .args(capsem.get_args());
    for (k, v) in capsem.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let codes: Vec<&str> = text.lines().collect();
    assert_eq!(
        codes.len(),
        3,
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in codes {
        let code = line.split_once('=').unwrap().1;
        assert!(
            code != "0" && code != CURL_TIMEOUT.to_string(),
            "a reserved address under open: {line}"
        );
    }
    let recs = jsonl(&log);
    for (name, ip, kind) in mapped {
        let why = format!("{ip} is {kind} and no rule names it");
        assert!(
            recs.iter().any(|r| r["kind"] == "connect"
                && r["name"] == name
                && r["verdict"] == "deny"
                && r["address"].is_null()
                && r["reason"] == why.as_str()),
            "{name}: no deny record saying {why:?}: {recs:?}"
        );
    }
    fx.assert_nothing_left();
}
