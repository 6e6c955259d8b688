//! A figure, not a check (ignored by default; nothing here asserts a
//! time): pull-and-convert time and cache size of a locally built image of
//! about python:3.12-slim's size (~120 MiB in three gzip layers, from this
//! host's /usr/lib/python3.11, /usr/lib/x86_64-linux-gnu and /usr/share),
//! pushed to a loopback docker-registry. Run it with release binaries:
//!
//! ```sh
//! cargo test --release -p capsem-cli --test image_bench -- --ignored --nocapture
//! ```

mod image_util;

use std::path::Path;
use std::time::Instant;

use image_util::*;

/// A tar of the regular files, directories and symlinks under `dir`, up to
/// `budget` bytes of file contents, in name order.
fn tar_of_dir(dir: &Path, budget: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let mut used = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let name = p.strip_prefix("/").expect("absolute");
            if m.is_dir() {
                b.append_dir(name, &p).expect("append a directory");
                stack.push(p);
            } else if ((m.is_file() && used + m.len() <= budget) || m.file_type().is_symlink())
                && b.append_path_with_name(&p, name).is_ok()
                && m.is_file()
            {
                used += m.len();
            }
        }
    }
    b.into_inner().expect("the tar")
}

#[test]
#[ignore = "a benchmark: run with --ignored --nocapture, in release"]
fn pull_and_convert_a_python_slim_sized_image() {
    const MIB: u64 = 1 << 20;
    let tars = vec![
        tar_of_dir(Path::new("/usr/lib/python3.11"), 50 * MIB),
        tar_of_dir(Path::new("/usr/lib/x86_64-linux-gnu"), 50 * MIB),
        tar_of_dir(Path::new("/usr/share"), 20 * MIB),
    ];
    let img = TestImage::from_tars(tars);
    let raw: usize = img.tars.iter().map(Vec::len).sum();
    let gz: usize = img.blobs.iter().map(Vec::len).sum();
    let reg = Registry::start();
    reg.push("bench/slim", "1", &img);
    let reference = format!("{}/bench/slim:1", reg.addr);
    let home = tempfile::tempdir().unwrap();

    let t = Instant::now();
    let o = capsem(home.path(), &["image", "pull", &reference]);
    let cold = t.elapsed();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let t = Instant::now();
    let o = capsem(home.path(), &["image", "pull", &reference]);
    let warm = t.elapsed();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let rootfs = std::fs::metadata(image_dir(home.path(), &img.digest()).join("rootfs.erofs"))
        .unwrap()
        .len();
    println!(
        "layers: 3, {:.1} MiB uncompressed, {:.1} MiB gzip; cold pull+convert {:.2} s; \
         second pull (cached) {:.3} s; rootfs.erofs {:.1} MiB",
        raw as f64 / MIB as f64,
        gz as f64 / MIB as f64,
        cold.as_secs_f64(),
        warm.as_secs_f64(),
        rootfs as f64 / MIB as f64
    );
}
