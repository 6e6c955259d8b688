//! `capsem image import` of an OCI layout (directory and tar) and of a
//! classic `docker save` archive; `image ls [--json]` and `image rm`.

mod image_util;

use image_util::*;

#[test]
fn import_an_oci_layout_directory_and_tar() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let img = TestImage::new("layout");
    let layout = tempfile::tempdir().unwrap();
    img.write_oci_layout(layout.path(), "docker.io/test/layout:1.0");

    let o = capsem(h, &["image", "import", layout.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("{} docker.io/test/layout:1.0\n", img.digest())
    );
    let tree = extract(&image_dir(h, &img.digest()).join("rootfs.erofs"));
    assert_standard_tree(&tree.path().join("x"));
    assert_eq!(stored_config(h, &img.digest())["WorkingDir"], "/app");
    // The user's layout is left as it was.
    assert_eq!(
        std::fs::read_dir(layout.path().join("blobs/sha256"))
            .unwrap()
            .count(),
        5
    );

    // The same layout as a tar, under another home.
    let home2 = tempfile::tempdir().unwrap();
    let tar_path = layout.path().join("../layout.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&tar_path).unwrap());
    b.append_dir_all(".", layout.path()).unwrap();
    b.finish().unwrap();
    drop(b);
    let o = capsem(
        home2.path(),
        &["image", "import", tar_path.to_str().unwrap()],
    );
    std::fs::remove_file(&tar_path).unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with(&img.digest()));
    assert_no_staging_left(home2.path());

    // A blob that does not match its name is refused; nothing cached.
    let home3 = tempfile::tempdir().unwrap();
    let layer = layout
        .path()
        .join("blobs/sha256")
        .join(&sha(&img.blobs[1])[7..]);
    let mut data = std::fs::read(&layer).unwrap();
    data[0] ^= 1;
    std::fs::write(&layer, data).unwrap();
    let o = capsem(
        home3.path(),
        &["image", "import", layout.path().to_str().unwrap()],
    );
    assert_fails_with(&o, "digest mismatch");
    assert!(!image_dir(home3.path(), &img.digest()).exists());
    assert_no_staging_left(home3.path());
}

#[test]
fn import_docker_save_then_ls_and_rm() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let img = TestImage::new("saved");
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("saved.tar");
    std::fs::write(&archive, img.docker_save("test/saved:2.0")).unwrap();

    let o = capsem(h, &["image", "import", archive.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let line = stdout(&o);
    let (digest, name) = line.trim_end().split_once(' ').unwrap();
    assert_eq!(name, "docker.io/test/saved:2.0");
    let tree = extract(&image_dir(h, digest).join("rootfs.erofs"));
    assert_standard_tree(&tree.path().join("x"));
    assert_eq!(stored_config(h, digest)["Env"][1], "GREETING=hello");
    // Importing again finds it cached, same digest.
    let o = capsem(h, &["image", "import", archive.to_str().unwrap()]);
    assert_eq!(stdout(&o), line);

    let o = capsem(h, &["image", "ls", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["digest"], digest);
    assert_eq!(
        list[0]["references"],
        serde_json::json!(["docker.io/test/saved:2.0"])
    );
    assert_eq!(list[0]["layers"], 3);
    assert!(list[0]["rootfs_bytes"].as_u64().unwrap() > 0);
    let o = capsem(h, &["image", "ls"]);
    let table = stdout(&o);
    assert!(table.starts_with("REFERENCE"), "{table}");
    assert!(table.contains("docker.io/test/saved:2.0"), "{table}");

    // rm by a name the cache does not have: one line, 125.
    assert_fails_with(
        &capsem(h, &["image", "rm", "test/other:1"]),
        "no image docker.io/test/other:1",
    );
    // rm by name (short form, normalized): the image goes with its last name.
    let o = capsem(h, &["image", "rm", "test/saved:2.0"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("untagged docker.io/test/saved:2.0\ndeleted {digest}\n")
    );
    assert!(!image_dir(h, digest).exists());
    assert_eq!(stdout(&capsem(h, &["image", "ls", "--json"])), "[]\n");
    assert_no_staging_left(h);

    // Not an image archive at all.
    std::fs::write(&archive, b"not a tar").unwrap();
    let o = capsem(h, &["image", "import", archive.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    assert_no_staging_left(h);
}
