//! `-p [HOST_IP:]HOST_PORT:GUEST_PORT` refusals that need no VM: each is one
//! `capsem: ...` line on stderr and exit 125 before anything boots, and
//! leaves no process, no listener and no VM state behind.
#![allow(clippy::unwrap_used)]

use capsem_tests::persist::{capsem, ok, refused};
use capsem_tests::{Backend, Fixture};

#[test]
fn bad_published_ports_are_refused_before_anything_boots() {
    let fx = Fixture::new("publish_refusals", Backend::Qemu);
    let cases = [
        ("8080", "expected [HOST_IP:]HOST_PORT:GUEST_PORT"),
        ("1:2:3:4", "expected [HOST_IP:]HOST_PORT:GUEST_PORT"),
        ("0:80", "port 0 cannot be published"),
        ("8080:0", "port 0 cannot be published"),
        ("65536:80", "is not a port"),
        ("8080:80/udp", "is not a port"),
        ("localhost:8080:80", "is not an IP address"),
        // An address this host does not have cannot be listened on.
        ("192.0.2.1:8080:80", "cannot listen on 192.0.2.1:8080"),
    ];
    for (spec, needle) in cases {
        for cmd in [
            &["run", "-p", spec, "--", "true"][..],
            &["shell", "-p", spec],
            &["create", "vm1", "-p", spec],
        ] {
            refused(&capsem(&fx, cmd), needle);
        }
    }
    refused(
        &capsem(
            &fx,
            &[
                "run",
                "-p",
                "8080:80",
                "-p",
                "0.0.0.0:8080:81",
                "--",
                "true",
            ],
        ),
        "host port 8080 is already published",
    );
    let many: Vec<String> = (0..33).map(|i| format!("{}:80", 20000 + i)).collect();
    let mut args = vec!["run"];
    for spec in &many {
        args.extend(["-p", spec]);
    }
    args.extend(["--", "true"]);
    refused(&capsem(&fx, &args), "at most 32 -p ports");
    fx.assert_nothing_left();
    // --vmm none has no guest to publish from.
    let none = Fixture::new("publish_refusals_none", Backend::None);
    refused(
        &capsem(&none, &["run", "-p", "8080:80", "--", "true"]),
        "-p needs a VM",
    );
    refused(
        &capsem(&none, &["create", "vm2", "-p", "8080:80"]),
        "-p needs a VM",
    );
    none.assert_nothing_left();
}

#[test]
fn a_persistent_vm_keeps_the_ports_create_gave_it() {
    let fx = Fixture::new("publish_named", Backend::None);
    ok(&fx, &["create", "dev"]);
    refused(
        &capsem(&fx, &["shell", "dev", "-p", "8080:80"]),
        "keeps what capsem create gave it",
    );
    let listed: serde_json::Value = serde_json::from_str(&ok(&fx, &["list", "--json"])).unwrap();
    assert_eq!(listed[0]["publish"], serde_json::json!([]));
    ok(&fx, &["rm", "--force", "dev"]);
    fx.assert_nothing_left();
}
