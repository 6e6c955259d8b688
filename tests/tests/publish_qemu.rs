//! Published ports (`-p`) in a real VM: `python3 -m http.server` in a
//! persistent VM is reachable at 127.0.0.1:HOST_PORT on the host (a small
//! file, a 1 MiB one byte-exact, four clients at once), a port with no
//! server behind it in the guest is a reset, the port stops answering when
//! the VM stops and answers again after `start`; a host port in use is exit
//! 125 with one line, from the CLI (`run`, `create`) and from capsem-process
//! (`start`); after a kill -9 of capsem-process the port is closed until
//! the adopting capsem-process listens again, and the guest's server
//! (started from the shell, which survives the crash) answers through it;
//! nothing is left behind. Every server and client is on
//! 127.0.0.1. `CAPSEM_SKIP_VM_TESTS=1 scripts/test.sh` leaves them out.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::Duration;

use capsem_tests::fixture::wait_until;
use capsem_tests::persist::{attach, capsem, exec, inspect, ok, process_pid, running, DETACH};
use capsem_tests::scenarios::{step, wait_ready};
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::Qemu;
const HELLO: &str = "hello through a published port";

/// A port free on 127.0.0.1 now (bound, then released).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `GET /path` over HTTP/1.0: `Ok((status line, body))`, or the error
/// (a reset, a refusal) that ended it first. `Ok` with an empty status
/// line: the connection closed without a byte.
fn get(port: u16, path: &str) -> std::io::Result<(String, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: capsem\r\n\r\n").as_bytes())?;
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    let Some(end) = all.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok((String::from_utf8_lossy(&all).into_owned(), Vec::new()));
    };
    let head = String::from_utf8_lossy(&all[..end]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, all[end + 4..].to_vec()))
}

/// `capsem exec NAME -- python3 -m http.server` serving /tmp/www, left
/// running (the VM's stop ends it).
fn serve(fx: &Fixture, name: &str) -> Child {
    let mut cmd = fx.capsem();
    cmd.args([
        "exec",
        name,
        "--",
        "python3",
        "-m",
        "http.server",
        "8000",
        "--bind",
        "127.0.0.1",
        "--directory",
        "/tmp/www",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd.spawn().unwrap()
}

/// Waits until the guest's server answers through the published port.
fn wait_served(port: u16) {
    wait_until(
        Duration::from_secs(60),
        "the guest's http.server through the published port",
        || matches!(get(port, "/hello.txt"), Ok((status, _)) if status.contains(" 200 ")),
    );
}

/// A reset or a close without a byte: the host accepted, the guest refused.
fn assert_refused_by_the_guest(port: u16) {
    match get(port, "/hello.txt") {
        Ok((status, body)) => assert!(
            status.is_empty() && body.is_empty(),
            "an answer with no server in the guest: {status:?}"
        ),
        Err(e) => assert_ne!(e.kind(), ErrorKind::ConnectionRefused, "{e}"),
    }
}

fn assert_not_listening(port: u16) {
    let got = TcpStream::connect(("127.0.0.1", port));
    assert_eq!(
        got.map(|_| ()).map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused),
        "127.0.0.1:{port} still answers"
    );
}

fn sha256_in_guest(fx: &Fixture, name: &str, path: &str) -> String {
    let out = exec(fx, name, &["--", "sha256sum", path], b"");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn sha256(bytes: &[u8]) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn http_server_is_reachable_until_the_vm_stops_and_again_after_start() {
    let fx = Fixture::new("publish_vm", B);
    let port = free_port();
    let spec = format!("{port}:8000");
    ok(&fx, &["create", "web", "-p", &spec]);
    let want = serde_json::json!([{"host_ip": "127.0.0.1", "host_port": port, "guest_port": 8000}]);
    assert_eq!(inspect(&fx, "web")["publish"], want);
    let list: serde_json::Value = serde_json::from_str(&ok(&fx, &["list", "--json"])).unwrap();
    assert_eq!(list[0]["publish"], want);

    // Listening, but nothing in the guest on 8000 yet.
    assert_refused_by_the_guest(port);

    let setup = format!(
        "mkdir -p /tmp/www && printf '%s' '{HELLO}' > /tmp/www/hello.txt && head -c 1048576 /dev/urandom > /tmp/www/big"
    );
    let out = exec(&fx, "web", &["--", "sh", "-c", &setup], b"");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut server = serve(&fx, "web");
    wait_served(port);
    let (status, body) = get(port, "/hello.txt").unwrap();
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(String::from_utf8_lossy(&body), HELLO);
    let (status, big) = get(port, "/big").unwrap();
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(big.len(), 1 << 20);
    assert_eq!(sha256(&big), sha256_in_guest(&fx, "web", "/tmp/www/big"));
    // Four clients at once, each its own relay.
    let clients: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || get(port, "/hello.txt").unwrap()))
        .collect();
    for c in clients {
        let (status, body) = c.join().unwrap();
        assert!(status.contains(" 200 "), "{status}");
        assert_eq!(String::from_utf8_lossy(&body), HELLO);
    }

    // Stopped: the port is closed, not just unanswered.
    ok(&fx, &["stop", "web"]);
    server.wait().unwrap();
    assert_not_listening(port);

    // Started again: listening at once, served once the server runs again.
    ok(&fx, &["start", "web"]);
    assert_refused_by_the_guest(port);
    let out = exec(&fx, "web", &["--", "sh", "-c", &setup], b"");
    assert!(out.status.success());
    let mut server = serve(&fx, "web");
    wait_served(port);
    ok(&fx, &["rm", "--force", "web"]);
    server.wait().unwrap();
    assert_not_listening(port);
    fx.assert_nothing_left();
}

#[test]
fn an_adopted_vm_listens_again() {
    let fx = Fixture::new("publish_adopt_vm", B);
    let port = free_port();
    ok(&fx, &["create", "web", "-p", &format!("{port}:8000")]);
    // From the persistent shell, which outlives capsem-process.
    let mut s = attach(&fx, "web");
    wait_ready(&mut s, B);
    s.line(&format!(
        "mkdir -p /tmp/www && printf '%s' '{HELLO}' > /tmp/www/hello.txt && \
         (python3 -m http.server 8000 --bind 127.0.0.1 --directory /tmp/www >/dev/null 2>&1 &) && echo STARTED-$((2*21))"
    ))
    .unwrap();
    s.expect("STARTED-42", step(B)).unwrap();
    s.send(DETACH).unwrap();
    assert_eq!(s.wait_code(step(B)).unwrap(), 0);
    wait_served(port);

    let pid = process_pid(&fx, "web");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(step(B), "the killed capsem-process to be gone", || {
        !running(pid)
    });
    assert_not_listening(port);
    // The next command adopts the guest; its capsem-process listens again
    // and the same server answers.
    ok(&fx, &["exec", "web", "--", "true"]);
    assert_eq!(inspect(&fx, "web")["adoptions"], 1);
    let (status, body) = get(port, "/hello.txt").unwrap();
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(String::from_utf8_lossy(&body), HELLO);
    ok(&fx, &["rm", "--force", "web"]);
    assert_not_listening(port);
    fx.assert_nothing_left();
}

/// One line on stderr, `capsem: ...`, naming the port as in use.
fn assert_in_use_line(out: &std::process::Output, port: u16) {
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("capsem: "), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn a_port_in_use_is_exit_125_with_one_line_and_nothing_left() {
    let fx = Fixture::new("publish_in_use_vm", B);
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let spec = format!("{port}:8000");
    // Refused by the CLI before anything boots.
    let out = capsem(&fx, &["run", "-p", &spec, "--", "true"]);
    assert_in_use_line(&out, port);
    let out = capsem(&fx, &["create", "busy", "-p", &spec]);
    assert_in_use_line(&out, port);
    fx.assert_nothing_left();

    // Taken while the VM was stopped: capsem-process's startup error.
    let later = free_port();
    ok(&fx, &["create", "later", "-p", &format!("{later}:8000")]);
    ok(&fx, &["stop", "later"]);
    let taken = TcpListener::bind(("127.0.0.1", later)).unwrap();
    let out = capsem(&fx, &["start", "later"]);
    assert_in_use_line(&out, later);
    assert_eq!(inspect(&fx, "later")["state"], "stopped");
    drop(taken);
    ok(&fx, &["rm", "later"]);
    drop(held);
    fx.assert_nothing_left();
}
