//! `-v HOST_DIR:GUEST_PATH[:MODE]` refusals that need no VM: each is one
//! `capsem: ...` line on stderr and exit 125 before anything boots, and
//! leaves no process or VM state behind.
#![allow(clippy::unwrap_used)]

use capsem_tests::persist::{capsem, ok, refused};
use capsem_tests::{Backend, Fixture};

#[test]
fn bad_shares_are_refused_before_anything_boots() {
    let fx = Fixture::new("share_refusals", Backend::Qemu);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let f = file.to_str().unwrap();
    let cases: Vec<(String, &str)> = vec![
        ("rel/dir:/w".into(), "must be absolute"),
        (format!("{d}/missing:/w"), "cannot use host directory"),
        (format!("{f}:/w"), "is not a directory"),
        (format!("{d}:w"), "is not absolute"),
        (format!("{d}:/"), "is the root directory"),
        (format!("{d}:/w/../x"), "'..'"),
        (format!("{d}:/proc/x"), "the guest needs"),
        (format!("{d}:/w:rx"), "unknown mode"),
        (format!("{d}:/w:ro:x"), "HOST_DIR:GUEST_PATH[:MODE]"),
    ];
    for (spec, needle) in &cases {
        for cmd in [
            &["run", "-v", spec, "--", "true"][..],
            &["shell", "-v", spec],
            &["create", "vm1", "-v", spec],
        ] {
            refused(&capsem(&fx, cmd), needle);
        }
    }
    let dup = format!("{d}:/w");
    refused(
        &capsem(&fx, &["run", "-v", &dup, "-v", &dup, "--", "true"]),
        "overlaps",
    );
    let nested = format!("{d}:/w/sub");
    refused(
        &capsem(&fx, &["run", "-v", &dup, "-v", &nested, "--", "true"]),
        "overlaps",
    );
    fx.assert_nothing_left();
    // --vmm none cannot enforce ro or overlay.
    let none = Fixture::new("share_refusals_none", Backend::None);
    refused(
        &capsem(&none, &["run", "-v", &dup, "--", "true"]),
        "-v needs a VM",
    );
    refused(
        &capsem(&none, &["create", "vm2", "-v", &dup]),
        "-v needs a VM",
    );
    none.assert_nothing_left();
}

#[test]
fn a_persistent_vm_keeps_the_shares_create_gave_it() {
    let fx = Fixture::new("share_named", Backend::None);
    ok(&fx, &["create", "dev"]);
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("{}:/w", dir.path().display());
    refused(
        &capsem(&fx, &["shell", "dev", "-v", &spec]),
        "keeps what capsem create gave it",
    );
    let listed: serde_json::Value = serde_json::from_str(&ok(&fx, &["list", "--json"])).unwrap();
    assert_eq!(listed[0]["shares"], serde_json::json!([]));
    ok(&fx, &["rm", "--force", "dev"]);
    fx.assert_nothing_left();
}
