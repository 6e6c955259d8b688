//! The guest's egress in a real VM (`--net`): every server is a loopback
//! listener of this test, reached through names that `CAPSEM_NET_HOSTS`
//! (capsem-process's test override) maps to 127.0.0.1; nothing else is
//! ever dialled. Allowed: `curl` gets the body; a TLS ClientHello with the
//! name's SNI is relayed. Denied: a name not in the list (NXDOMAIN), the
//! allowed address with another Host or SNI (fronting), a
//! second port on the allowed name, UDP and ICMP out (refused at the send
//! by the guest's firewall, recorded through the agent's log reader); each
//! leaves its record in `net.jsonl`. `--net none`: curl fails and the server sees nothing,
//! and the guest loads none of the network's kernel modules.
//! `CAPSEM_SKIP_VM_TESTS=1 scripts/test.sh` leaves them out.
#![allow(clippy::unwrap_used)]

use capsem_tests::net::{capsem_with_hosts, curl, records, Server, BODY};
use capsem_tests::persist::{capsem, exec, inspect, ok, vm_dir};
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::Qemu;

/// One UDP datagram and one ICMP echo to a documentation address (the
/// guest has no network card: neither can leave the VM); prints how each
/// send ended.
const DROPPED_PY: &str = r#"
import socket
def send(name, kind, proto, data, port):
    s = socket.socket(socket.AF_INET, kind, proto)
    s.settimeout(1)
    try:
        s.sendto(data, ("192.0.2.1", port))
        s.recv(1)
        print(name, "answered")
    except OSError as e:
        print(name, type(e).__name__)
send("udp", socket.SOCK_DGRAM, 0, b"x", 9)
send("icmp", socket.SOCK_RAW, socket.IPPROTO_ICMP, b"\x08\x00\xf7\xff\x00\x00\x00\x00", 0)
"#;
#[test]
fn allowed_names_connect_and_everything_else_is_refused_and_recorded() {
    let fx = Fixture::new("net_vm", B);
    let server = Server::start();
    let other = Server::start();
    let hosts = fx.home().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 test.capsem other.capsem nope.capsem\n").unwrap();
    let p = server.port;
    let allow = format!("allow=test.capsem:{p},127.0.0.1:{p}");
    let out = capsem_with_hosts(&fx, &hosts, &["create", "net1", "--net", &allow])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = inspect(&fx, "net1");
    assert_eq!(info["net"], serde_json::json!([allow]));
    let dir = vm_dir(&fx, "net1");

    // Allowed: the body, through the relay; the server saw the name.
    let url = format!("http://test.capsem:{p}/");
    let (code, body, err) = curl(&fx, "net1", &[&url]);
    assert_eq!(code, Some(0), "curl failed: {err}");
    assert_eq!(body, BODY);
    assert_eq!(server.conns(), 1);
    assert_eq!(server.hosts.lock().unwrap()[0], format!("test.capsem:{p}"));

    // A name not in the list: not resolved (curl's exit 6), no connection.
    let (code, _, _) = curl(&fx, "net1", &[&format!("http://nope.capsem:{p}/")]);
    assert_eq!(code, Some(6), "nope.capsem must not resolve");
    // Fronting: the allowed name's address, another Host.
    let (code, _, _) = curl(&fx, "net1", &["-H", "Host: other.capsem", &url]);
    assert_ne!(code, Some(0), "another Host through the allowed name");
    // Another port on the allowed name.
    let url2 = format!("http://test.capsem:{}/", other.port);
    let (code, _, _) = curl(&fx, "net1", &[&url2]);
    assert_ne!(code, Some(0), "a port no rule names");
    assert_eq!(server.conns(), 1, "a refused connection reached the server");
    assert_eq!(other.conns(), 0, "a refused connection reached the server");
    // UDP anywhere but the resolver, and ICMP, go nowhere: the guest's
    // firewall refuses the send at once (EPERM, not a timeout), and the
    // agent tells the host, which records each destination.
    let out = exec(&fx, "net1", &["--", "python3", "-"], DROPPED_PY.as_bytes());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["udp PermissionError", "icmp PermissionError"],
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let packet = |proto: &'static str, port: Option<u16>| {
        move |r: &serde_json::Value| {
            r["kind"] == "packet"
                && r["verdict"] == "deny"
                && r["proto"] == proto
                && r["guest_ip"] == "192.0.2.1"
                && r["port"] == serde_json::json!(port)
                && r["count"].as_u64().is_some_and(|n| n >= 1)
        }
    };
    capsem_tests::fixture::wait_until(
        std::time::Duration::from_secs(30),
        "the dropped packets' records",
        || {
            let recs = records(&dir);
            recs.iter().any(packet("udp", Some(9))) && recs.iter().any(packet("icmp", None))
        },
    );

    // TLS: the ClientHello's SNI decides (the server is plain HTTP, so the
    // handshake fails after the relay, and that is enough here).
    let tls = format!("https://test.capsem:{p}/");
    let (code, _, _) = curl(&fx, "net1", &["-k", "--max-time", "5", &tls]);
    assert_ne!(code, Some(0));
    assert_eq!(server.conns(), 2, "the TLS connection was relayed");
    // Another SNI through the allowed name's address: refused.
    let front = format!("https://other.capsem:{p}/");
    let to = format!("other.capsem:{p}:test.capsem:{p}");
    let (code, _, _) = curl(&fx, "net1", &["-k", "--connect-to", &to, &front]);
    assert_ne!(code, Some(0));
    assert_eq!(
        server.conns(),
        2,
        "a fronted TLS connection reached the server"
    );

    // A connect is recorded when its relay ends: the TLS one once the
    // server gives up on it or the relay's idle bound after curl left.
    capsem_tests::fixture::wait_until(
        std::time::Duration::from_secs(90),
        "the TLS connection's record",
        || {
            records(&dir)
                .iter()
                .filter(|r| r["verdict"] == "allow")
                .count()
                == 2
        },
    );
    let recs = records(&dir);
    let tls_recs: Vec<_> = recs
        .iter()
        .filter(|r| r["kind"] == "connect" && r["seen"] == "test.capsem" && r["port"] == p)
        .collect();
    assert_eq!(tls_recs.len(), 2, "{recs:?}");
    assert!(tls_recs.iter().all(|r| r["verdict"] == "allow"));
    let fronted = recs
        .iter()
        .filter(|r| r["seen"] == "other.capsem" && r["verdict"] == "deny")
        .count();
    assert_eq!(fronted, 2, "the Host and the SNI fronting: {recs:?}");
    let allowed: Vec<_> = recs
        .iter()
        .filter(|r| r["kind"] == "connect" && r["verdict"] == "allow")
        .collect();
    assert_eq!(allowed.len(), 2, "HTTP and TLS: {recs:?}");
    assert_eq!(allowed[0]["name"], "test.capsem");
    assert_eq!(allowed[0]["address"], format!("127.0.0.1:{p}"));
    assert!(allowed[0]["bytes_in"].as_u64().unwrap() > BODY.len() as u64);
    assert!(allowed[0]["bytes_out"].as_u64().unwrap() > 0);
    assert!(
        recs.iter().any(|r| r["kind"] == "resolve"
            && r["name"] == "nope.capsem"
            && r["verdict"] == "deny"),
        "{recs:?}"
    );
    assert!(
        recs.iter().any(|r| r["kind"] == "connect"
            && r["verdict"] == "deny"
            && r["seen"] == "other.capsem"),
        "{recs:?}"
    );
    assert!(
        recs.iter()
            .any(|r| r["kind"] == "connect" && r["verdict"] == "deny" && r["port"] == other.port),
        "{recs:?}"
    );
    // The dummy interface has no IPv6: no router solicitation was dropped
    // and recorded.
    assert!(
        !recs.iter().any(|r| r["proto"] == "icmpv6"),
        "IPv6 noise: {recs:?}"
    );
    // `capsem audit --net`: one line per record, the allowed one first.
    let text = ok(&fx, &["audit", "net1", "--net"]);
    assert_eq!(text.lines().count(), recs.len(), "{text}");
    assert!(
        text.lines().next().unwrap().contains(&format!(
            " allow connect test.capsem:{p} seen=test.capsem -> 127.0.0.1:{p} "
        )),
        "{text}"
    );
    let json = ok(&fx, &["audit", "net1", "--net", "--json"]);
    assert_eq!(json.lines().count(), recs.len());
    ok(&fx, &["rm", "--force", "net1"]);
    fx.assert_nothing_left();
}

#[test]
fn net_none_connects_nothing() {
    let fx = Fixture::new("net_none_vm", B);
    let server = Server::start();
    let hosts = fx.home().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 test.capsem\n").unwrap();
    let url = format!("http://test.capsem:{}/", server.port);
    let run = ["run", "--", "curl", "-sS", "--max-time", "10", &url];
    let out = capsem_with_hosts(&fx, &hosts, &run).output().unwrap();
    assert_ne!(
        out.status.code(),
        Some(0),
        "curl must fail without a network"
    );
    assert_eq!(server.conns(), 0);
    // Without a network (and without shares) the guest loads neither the
    // network's modules nor virtiofs; the disks' modules are there (ext4
    // is built into the cloud kernel, erofs and overlay are modules).
    let out = capsem(&fx, &["run", "--", "cat", "/proc/modules"]);
    assert_eq!(out.status.code(), Some(0));
    let modules = String::from_utf8_lossy(&out.stdout);
    for present in ["erofs ", "overlay "] {
        assert!(
            modules.contains(present),
            "{present:?} not loaded:\n{modules}"
        );
    }
    for absent in ["nf_tables ", "nf_conntrack ", "dummy ", "virtiofs "] {
        assert!(!modules.contains(absent), "{absent:?} loaded:\n{modules}");
    }
    // Malformed policy: one line, exit 125, nothing boots.
    let out = capsem(&fx, &["run", "--net", "allow=bad..name", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("capsem: "), "{err}");
    fx.assert_nothing_left();
}
