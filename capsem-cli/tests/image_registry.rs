//! `capsem image pull` against a real registry (Debian's docker-registry,
//! on a loopback port): the flattened root, the stored config, the cache
//! (a second pull fetches no blob), a corrupted blob refused with nothing
//! cached, and an unreachable registry. The registry is killed and reaped
//! even on failure (a Drop guard), and the test checks it is gone.

mod image_util;

use image_util::*;

#[test]
fn pull_converts_caches_and_refuses_a_corrupted_blob() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let mut reg = Registry::start();
    let img = TestImage::new("one");
    reg.push("test/img", "1.0", &img);
    let reference = format!("{}/test/img:1.0", reg.addr);

    let o = capsem(h, &["image", "pull", &reference]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{}\n", img.digest()));
    // Not a terminal: no progress drawn.
    assert_eq!(stderr(&o), "");
    let dir = image_dir(h, &img.digest());
    let tree = extract(&dir.join("rootfs.erofs"));
    assert_standard_tree(&tree.path().join("x"));
    let config = stored_config(h, &img.digest());
    assert_eq!(config["Env"][1], "GREETING=hello");
    assert_eq!(config["WorkingDir"], "/app");
    assert_eq!(config["User"], "1000:1000");
    assert_eq!(config["Entrypoint"], serde_json::json!(["/bin/sh"]));
    assert_eq!(config["Cmd"], serde_json::json!(["/app/run.sh"]));
    assert_no_staging_left(h);

    // On a terminal (script(1) gives it one), the progress is drawn on
    // stderr, and erased at the end; stdout keeps only the digest.
    let home_tty = tempfile::tempdir().unwrap();
    let cmd = format!(
        "{} --home {} image pull {reference}",
        env!("CARGO_BIN_EXE_capsem"),
        home_tty.path().display()
    );
    let o = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("DOCKER_CONFIG", home_tty.path().join("none"))
        .output()
        .expect("script(1)");
    let tty = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{tty}");
    assert!(
        tty.contains("layer 3/3") && tty.contains("converting 3 layers"),
        "{tty:?}"
    );
    assert!(tty.contains(&img.digest()), "{tty:?}");

    // A second pull asks for the manifest only: no blob GET.
    let gets = reg.blob_gets();
    assert!(gets >= 4, "config and three layers: {}", reg.log());
    let o = capsem(h, &["image", "pull", &reference]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{}\n", img.digest()));
    assert_eq!(reg.blob_gets(), gets, "{}", reg.log());

    // A blob corrupted in the registry's storage (same length): refused,
    // nothing cached, no name recorded.
    let bad = TestImage::new("two");
    reg.push("test/bad", "1.0", &bad);
    let victim = reg.blob_file(&image_util::sha(&bad.blobs[0]));
    let mut data = std::fs::read(&victim).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&victim, data).unwrap();
    let o = capsem(h, &["image", "pull", &format!("{}/test/bad:1.0", reg.addr)]);
    assert_fails_with(&o, "digest mismatch");
    assert!(!image_dir(h, &bad.digest()).exists());
    assert_no_staging_left(h);
    let refs = std::fs::read_to_string(h.join("images/oci/refs.json")).unwrap();
    assert!(!refs.contains("test/bad"), "{refs}");

    // An artifact that is not an image (a Helm chart's config type).
    let helm = String::from_utf8(img.manifest.clone()).unwrap().replace(
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.cncf.helm.config.v1+json",
    );
    let (status, _, _) = reg
        .request(
            "PUT",
            "/v2/test/img/manifests/helm",
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            helm.as_bytes(),
        )
        .unwrap();
    assert_eq!(status, 201);
    let o = capsem(
        h,
        &["image", "pull", &format!("{}/test/img:helm", reg.addr)],
    );
    assert_fails_with(
        &o,
        "unsupported media type \"application/vnd.cncf.helm.config.v1+json\"",
    );
    assert_no_staging_left(h);

    // A missing tag: one line, 125.
    let o = capsem(
        h,
        &["image", "pull", &format!("{}/test/img:nope", reg.addr)],
    );
    assert_fails_with(&o, "not found");

    // Only the one good image was ever cached.
    let cached = std::fs::read_dir(h.join("images/oci/sha256"))
        .unwrap()
        .count();
    assert_eq!(cached, 1);

    let pid = reg.stop().unwrap();
    assert!(!alive(pid), "the registry (pid {pid}) is gone");
}

#[test]
fn credentials_come_from_registry_auth_or_the_docker_config() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let mut reg = Registry::start_with_basic_auth();
    let img = TestImage::new("auth");
    reg.push("team/tool", "1.0", &img);
    let reference = format!("{}/team/tool:1.0", reg.addr);

    // Anonymous: refused, one line, 125, nothing cached.
    let o = capsem(h, &["image", "pull", &reference]);
    assert_fails_with(&o, "not authorized (credentials: --registry-auth FILE");
    assert!(!image_dir(h, &img.digest()).exists());

    // --registry-auth FILE (Docker's config.json format).
    let creds = tempfile::tempdir().unwrap();
    let config = serde_json::json!({"auths": {reg.addr.to_string(): {"auth": TEST_BASIC}}});
    let file = creds.path().join("config.json");
    std::fs::write(&file, serde_json::to_vec(&config).unwrap()).unwrap();
    let o = capsem(
        h,
        &[
            "image",
            "pull",
            "--registry-auth",
            file.to_str().unwrap(),
            &reference,
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(image_dir(h, &img.digest()).join("rootfs.erofs").is_file());

    // $DOCKER_CONFIG/config.json, username and password fields.
    let config = serde_json::json!({"auths": {reg.addr.to_string():
        {"username": TEST_USER, "password": TEST_PASSWORD}}});
    std::fs::write(&file, serde_json::to_vec(&config).unwrap()).unwrap();
    let home2 = tempfile::tempdir().unwrap();
    let o = capsem_with_docker_config(home2.path(), creds.path(), &["image", "pull", &reference]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{}\n", img.digest()));

    // A named credentials file that does not exist is an error, not anonymous.
    let o = capsem(
        h,
        &[
            "image",
            "pull",
            "--registry-auth",
            "/nonexistent/c.json",
            &reference,
        ],
    );
    assert_fails_with(&o, "cannot read registry credentials /nonexistent/c.json");

    let pid = reg.stop().unwrap();
    assert!(!alive(pid), "the registry (pid {pid}) is gone");
}

#[test]
fn an_unreachable_registry_is_one_line_and_125() {
    let home = tempfile::tempdir().unwrap();
    // A loopback port nobody listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = capsem(
        home.path(),
        &["image", "pull", &format!("127.0.0.1:{port}/x/y:1")],
    );
    assert_fails_with(&o, &format!("cannot reach registry 127.0.0.1:{port}"));
    assert_no_staging_left(home.path());
}
