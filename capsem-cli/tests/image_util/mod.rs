//! What the `image_*` tests share: a small image built here (three
//! layers: a base, a whiteout, an opaque directory), written as registry
//! blobs, an OCI layout or a `docker save` archive; a loopback
//! `docker-registry` ([`capsem_tests::registry`]); running `capsem` against a temporary home; and
//! reading an EROFS image back with `fsck.erofs --extract`.

// Test helpers: a failed step panics with its cause, as in a #[test].
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest as _, Sha256};

pub fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A tar of (path, kind, contents or link target).
pub fn tar_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(*kind);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match kind {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                h.set_size(0);
                b.append_link(&mut h, path, std::str::from_utf8(data).unwrap())
                    .unwrap();
            }
            _ => {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, path, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// An image: uncompressed layer tars, their gzip blobs, config, manifest.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub tars: Vec<Vec<u8>>,
    pub blobs: Vec<Vec<u8>>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl TestImage {
    /// The standard image; `salt` changes the base layer (a new digest).
    pub fn new(salt: &str) -> Self {
        use tar::EntryType as T;
        let base = tar_of(&[
            ("etc/", T::Directory, b""),
            ("etc/keep", T::Regular, b"kept"),
            ("etc/gone", T::Regular, b"deleted by a whiteout"),
            ("etc/salt", T::Regular, salt.as_bytes()),
            ("data/", T::Directory, b""),
            ("data/old", T::Regular, b"hidden by an opaque dir"),
            ("app/", T::Directory, b""),
            ("app/run.sh", T::Regular, b"#!/bin/sh\necho hi\n"),
            ("app/link", T::Symlink, b"run.sh"),
        ]);
        let whiteout = tar_of(&[
            ("etc/", T::Directory, b""),
            ("etc/.wh.gone", T::Regular, b""),
        ]);
        let opaque = tar_of(&[
            ("data/", T::Directory, b""),
            ("data/.wh..wh..opq", T::Regular, b""),
            ("data/new", T::Regular, b"new"),
        ]);
        Self::from_tars(vec![base, whiteout, opaque])
    }

    pub fn from_tars(tars: Vec<Vec<u8>>) -> Self {
        let blobs: Vec<Vec<u8>> = tars.iter().map(|t| gzip(t)).collect();
        let diff_ids: Vec<String> = tars.iter().map(|t| sha(t)).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "created": "2026-01-02T03:04:05Z",
            "config": {
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello"],
                "WorkingDir": "/app",
                "User": "1000:1000",
                "Entrypoint": ["/bin/sh"],
                "Cmd": ["/app/run.sh"]
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids}
        }))
        .unwrap();
        let manifest = Self::manifest_for(&config, &blobs);
        Self {
            tars,
            blobs,
            config,
            manifest,
        }
    }

    fn manifest_for(config: &[u8], blobs: &[Vec<u8>]) -> Vec<u8> {
        let layers: Vec<_> = blobs
            .iter()
            .map(|b| {
                serde_json::json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha(b), "size": b.len()
                })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": sha(config), "size": config.len()},
            "layers": layers
        }))
        .unwrap()
    }

    pub fn digest(&self) -> String {
        sha(&self.manifest)
    }

    /// An OCI image layout in `dir`, named `name` by annotation.
    pub fn write_oci_layout(&self, dir: &Path, name: &str) {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        for b in self.blobs.iter().chain([&self.config, &self.manifest]) {
            std::fs::write(blobs.join(&sha(b)[7..]), b).unwrap();
        }
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": self.digest(), "size": self.manifest.len(),
                "annotations": {"io.containerd.image.name": name,
                                "org.opencontainers.image.ref.name": "1.0"}
            }]
        });
        std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }

    /// A classic `docker save` archive (uncompressed layers, `<id>/layer.tar`).
    pub fn docker_save(&self, repo_tag: &str) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, data).unwrap();
        };
        let config_name = format!("{}.json", &sha(&self.config)[7..]);
        let mut layers = Vec::new();
        for t in &self.tars {
            let name = format!("{}/layer.tar", &sha(t)[7..]);
            add(&name, t);
            layers.push(name);
        }
        add(&config_name, &self.config);
        let manifest = serde_json::json!([{
            "Config": config_name, "RepoTags": [repo_tag], "Layers": layers
        }]);
        add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
        b.into_inner().unwrap()
    }
}

/// `capsem --home HOME ARGS`, with no Docker config.
pub fn capsem(home: &Path, args: &[&str]) -> Output {
    capsem_with_docker_config(home, &home.join("no-docker-config"), args)
}

/// `capsem --home HOME ARGS` with `$DOCKER_CONFIG` set to `docker_config`.
pub fn capsem_with_docker_config(home: &Path, docker_config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_capsem"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env_remove("CAPSEM_HOME")
        .env("DOCKER_CONFIG", docker_config)
        .stdin(Stdio::null())
        .output()
        .expect("run capsem")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failure: exit 125 and one `capsem: ` line containing `want`.
pub fn assert_fails_with(o: &Output, want: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("capsem: ") && err.contains(want), "{err}");
}

/// The tree inside an EROFS image.
pub fn extract(rootfs: &Path) -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("x");
    let o = Command::new("fsck.erofs")
        .arg(format!("--extract={}", dest.display()))
        .arg(rootfs)
        .output()
        .expect("fsck.erofs (erofs-utils)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

/// Checks the standard image's flattened tree.
pub fn assert_standard_tree(tree: &Path) {
    assert_eq!(std::fs::read(tree.join("etc/keep")).unwrap(), b"kept");
    assert!(!tree.join("etc/gone").exists(), "the whiteout applied");
    assert!(!tree.join("etc/.wh.gone").exists());
    assert!(
        !tree.join("data/old").exists(),
        "the opaque directory applied"
    );
    assert_eq!(std::fs::read(tree.join("data/new")).unwrap(), b"new");
    assert_eq!(
        std::fs::read_link(tree.join("app/link")).unwrap(),
        Path::new("run.sh")
    );
}

/// The stored config of a cached image.
pub fn stored_config(home: &Path, digest: &str) -> serde_json::Value {
    let p = image_dir(home, digest).join("config.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

pub fn image_dir(home: &Path, digest: &str) -> PathBuf {
    home.join("images/oci/sha256").join(&digest[7..])
}

/// What the cache holds besides finished images: staging must be empty.
pub fn assert_no_staging_left(home: &Path) {
    let tmp = home.join("images/oci/tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use capsem_tests::registry::{alive, Registry, TEST_BASIC, TEST_PASSWORD, TEST_USER};

impl capsem_tests::registry::PushImage for TestImage {
    fn blobs(&self) -> &[Vec<u8>] {
        &self.blobs
    }
    fn config(&self) -> &[u8] {
        &self.config
    }
    fn manifest(&self) -> &[u8] {
        &self.manifest
    }
}
