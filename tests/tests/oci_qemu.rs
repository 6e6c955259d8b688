//! OCI images in real VMs under QEMU: a tiny image (a static busybox base
//! layer, a whiteout layer, Env, WorkingDir, User, Entrypoint and Cmd) is
//! imported as an OCI layout and booted with `--image`: its root replaces
//! the default one, a whiteout hides a base file, Env and WorkingDir reach
//! the command (the client's `-e` wins), User runs it as that user, and
//! `run --image` with no command runs Entrypoint + Cmd. A persistent VM
//! records the image and boots it again after stop/start. Pulled from a
//! loopback `docker-registry`, a second run fetches no blob again.
//! `CAPSEM_SKIP_VM_TESTS=1 scripts/test.sh` leaves them out.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Output, Stdio};

use capsem_image::Digest;
use capsem_tests::persist::{self, ok};
use capsem_tests::registry::{PushImage, Registry};
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::Qemu;
const BUSYBOX: &str = "/bin/busybox";

/// One tar layer from (path, kind, data): `d` directory, `l` symlink to
/// data, `x` executable, `f` file.
fn layer(entries: &[(&str, char, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        match kind {
            'd' => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
            'l' => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, std::str::from_utf8(data).unwrap())
                    .unwrap();
            }
            _ => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(if *kind == 'x' { 0o755 } else { 0o644 });
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// The test image's blobs.
struct TestImage {
    layers: Vec<Vec<u8>>,
    config: Vec<u8>,
    manifest: Vec<u8>,
}

impl PushImage for TestImage {
    fn blobs(&self) -> &[Vec<u8>] {
        &self.layers
    }
    fn config(&self) -> &[u8] {
        &self.config
    }
    fn manifest(&self) -> &[u8] {
        &self.manifest
    }
}

/// The test image with `user` as its User.
fn build(user: &str) -> TestImage {
    let busybox = std::fs::read(BUSYBOX)
        .unwrap_or_else(|e| panic!("{BUSYBOX}: {e}: run scripts/install-deps.sh (busybox-static)"));
    let base = layer(&[
        ("bin", 'd', b""),
        ("bin/busybox", 'x', &busybox),
        ("bin/sh", 'l', b"busybox"),
        ("bin/cat", 'l', b"busybox"),
        ("bin/id", 'l', b"busybox"),
        ("etc", 'd', b""),
        (
            "etc/passwd",
            'f',
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        ),
        ("etc/group", 'f', b"root:x:0:\napp:x:1000:\n"),
        ("root", 'd', b""),
        ("tmp", 'd', b""),
        ("kept", 'f', b"kept-content\n"),
        ("deleted", 'f', b"whited out\n"),
    ]);
    let whiteout = layer(&[(".wh.deleted", 'f', b"")]);
    let layers = vec![base, whiteout];
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "FOO=from the image"],
            "WorkingDir": "/work/dir",
            "User": user,
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo entry $FOO $(id -u)"]
        },
        "rootfs": {"type": "layers",
                   "diff_ids": layers.iter().map(|l| Digest::of(l).to_string()).collect::<Vec<_>>()}
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": Digest::of(&config).to_string(), "size": config.len()},
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": Digest::of(l).to_string(), "size": l.len()
        })).collect::<Vec<_>>()
    }))
    .unwrap();
    TestImage {
        layers,
        config,
        manifest,
    }
}

/// Writes the test image as an OCI layout named `name` (tag `1`) into
/// `dir`, with `user` as its User.
fn write_layout(dir: &Path, name: &str, user: &str) {
    let TestImage {
        layers,
        config,
        manifest,
    } = build(user);
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for b in layers.iter().chain([&config, &manifest]) {
        std::fs::write(blobs.join(Digest::of(b).hex()), b).unwrap();
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": Digest::of(&manifest).to_string(), "size": manifest.len(),
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": "1"}
        }]
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Imports the test image into the fixture's home as `t/NAME:1`.
fn import(fx: &Fixture, name: &str, user: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    write_layout(dir.path(), &format!("t/{name}:1"), user);
    ok(fx, &["image", "import", dir.path().to_str().unwrap()]);
    format!("t/{name}:1")
}

fn run(fx: &Fixture, args: &[&str]) -> Output {
    fx.capsem()
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stdout_of(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn an_image_root_with_its_env_workdir_user_and_entrypoint() {
    let fx = Fixture::new("oci_run", B);
    let img = import(&fx, "img", "root");
    let script = "cat /kept; test ! -e /deleted && echo whiteout; echo \"$FOO\"; pwd; \
                  test ! -e /usr/bin/python3 && echo not-debian";
    let out = run(&fx, &["--image", &img, "--", "sh", "-c", script]);
    assert_eq!(
        stdout_of(&out),
        "kept-content\nwhiteout\nfrom the image\n/work/dir\nnot-debian\n"
    );
    let out = run(
        &fx,
        &[
            "-e",
            "FOO=client",
            "--image",
            &img,
            "--",
            "sh",
            "-c",
            "echo $FOO",
        ],
    );
    assert_eq!(stdout_of(&out), "client\n");
    // No command: Entrypoint + Cmd.
    let out = run(&fx, &["--image", &img]);
    assert_eq!(stdout_of(&out), "entry from the image 0\n");

    let app = import(&fx, "app", "app");
    let out = run(
        &fx,
        &[
            "--image",
            &app,
            "--",
            "sh",
            "-c",
            "echo $(id -u):$(id -g) $HOME",
        ],
    );
    assert_eq!(stdout_of(&out), "1000:1000 /home/app\n");
    fx.assert_nothing_left();
}

#[test]
fn a_persistent_vm_keeps_its_image_across_stop_and_start() {
    let fx = Fixture::new("oci_persist", B);
    let img = import(&fx, "img", "root");
    ok(
        &fx,
        &["create", "pv", "--image", &img, "--disk-size", "256M"],
    );
    let info = persist::inspect(&fx, "pv");
    assert_eq!(info["oci_image"]["reference"], img.as_str());
    assert!(info["oci_image"]["digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert_eq!(info["disk"]["size_bytes"], 256u64 << 20);
    ok(&fx, &["stop", "pv"]);
    ok(&fx, &["start", "pv"]);
    let got = ok(
        &fx,
        &["exec", "pv", "--", "sh", "-c", "cat /kept; echo $FOO; pwd"],
    );
    assert_eq!(got, "kept-content\nfrom the image\n/work/dir\n");
    ok(&fx, &["rm", "--force", "pv"]);
    fx.assert_nothing_left();
}

#[test]
fn pulled_from_a_loopback_registry_once() {
    let fx = Fixture::new("oci_registry", B);
    let registry = Registry::start();
    registry.push("t/img", "1", &build("root"));
    let reference = format!("{}/t/img:1", registry.addr);
    let script = "cat /kept; test ! -e /deleted && echo whiteout; echo \"$FOO\"; pwd";
    let out = run(&fx, &["--image", &reference, "--", "sh", "-c", script]);
    assert_eq!(
        stdout_of(&out),
        "kept-content\nwhiteout\nfrom the image\n/work/dir\n"
    );
    let gets = registry.blob_gets();
    assert!(
        gets >= 3,
        "the first run fetched the layers and config: {gets}"
    );
    let out = run(&fx, &["--image", &reference]);
    assert_eq!(stdout_of(&out), "entry from the image 0\n");
    assert_eq!(registry.blob_gets(), gets, "the second run fetched no blob");
    drop(registry);
    fx.assert_nothing_left();
}
