//! Shares (`-v HOST_DIR:GUEST_PATH[:MODE]`) in real VMs under QEMU: `rw`
//! round-trips (also as a non-root user, whose files the guest's stay),
//! `ro` refuses writes and leaves the host tree byte-for-byte as it was,
//! `overlay` keeps the host tree and `capsem diff` lists exactly the
//! guest's changes, escapes by symlink, `..` and hard link reach no host
//! file outside the share, a persistent VM's shares survive a capsem-process
//! SIGKILL and adoption, a file written through a mapping at the very end
//! still reaches the host; nothing is left (no virtiofsd, socket or mount).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use capsem_tests::fixture::{bin_dir, wait_until};
use capsem_tests::persist::{self, ok};
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::Qemu;

/// Every entry under `dir`: type, mode, owner, length, mtime and content
/// (a symlink's target), by relative path.
fn tree(dir: &Path) -> BTreeMap<PathBuf, (u32, u32, i64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = p.symlink_metadata().unwrap();
            let content = if m.is_file() {
                std::fs::read(&p).unwrap()
            } else if m.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                stack.push(p.clone());
                Vec::new()
            };
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            out.insert(rel, (m.mode(), m.uid(), m.mtime(), content));
        }
    }
    out
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `capsem run` with one `-v` per share, stdin closed, to completion.
fn run_with(fx: &Fixture, shares: &[String], command: &[&str]) -> Output {
    let mut cmd = fx.capsem();
    cmd.arg("run");
    for share in shares {
        cmd.arg("-v").arg(share);
    }
    cmd.arg("--")
        .args(command)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// No host mount names `dir` (virtiofsd's mounts live in its own
/// namespace and die with it).
fn assert_unmounted(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let d = dir.to_str().unwrap();
    assert!(
        !mounts.lines().any(|l| l.contains(d)),
        "a mount of {d} is left:\n{mounts}"
    );
}

/// A share dir and, beside it, a sentinel the guest must never reach.
struct Host {
    base: tempfile::TempDir,
}

impl Host {
    fn new() -> Self {
        let base = tempfile::Builder::new()
            .prefix("capsem-share")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::write(base.path().join("sentinel"), b"SENTINEL-SECRET\n").unwrap();
        Self { base }
    }
    fn dir(&self, name: &str) -> PathBuf {
        let d = self.base.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
    fn sentinel(&self) -> (Vec<u8>, i64) {
        let p = self.base.path().join("sentinel");
        (std::fs::read(&p).unwrap(), p.metadata().unwrap().mtime())
    }
    /// Nothing but the shares and the sentinel next to them.
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.base.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

#[test]
fn rw_ro_and_escapes_in_a_temporary_vm() {
    let fx = Fixture::new("share_rw_ro", B);
    let host = Host::new();
    let rw = host.dir("rw");
    let ro = host.dir("ro");
    std::fs::write(rw.join("in"), b"from the host\n").unwrap();
    std::os::unix::fs::symlink("/etc", rw.join("etc-link")).unwrap();
    std::os::unix::fs::symlink("../sentinel", rw.join("up-link")).unwrap();
    std::fs::write(ro.join("keep"), b"read only\n").unwrap();
    std::fs::create_dir(ro.join("sub")).unwrap();
    std::fs::write(ro.join("sub/deep"), b"deep\n").unwrap();
    let ro_before = tree(&ro);
    let sentinel = host.sentinel();
    let script = "\
cat /work/in; echo out > /work/out
cat /ro/keep
echo x > /ro/new 2>/dev/null || echo RO-REFUSED
rm /ro/keep 2>/dev/null || echo RM-REFUSED
# Escapes: every one resolves in the guest, never on the host.
cat /work/up-link /work/../sentinel /work/../../sentinel /ro/../sentinel 2>/dev/null
echo pwned > /work/up-link; echo pwned > /work/etc-link/capsem-escape
ln /etc/hostname /work/hard 2>/dev/null || echo HARD-REFUSED
ln /work/in /work/in2 && echo HARD-INSIDE
echo DONE";
    let shares = [
        format!("{}:/work", rw.display()),
        format!("{}:/ro:ro", ro.display()),
    ];
    let out = run_with(&fx, &shares, &["sh", "-c", script]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    for want in [
        "from the host\n",
        "read only\n",
        "RO-REFUSED\n",
        "RM-REFUSED\n",
        "HARD-REFUSED\n",
        "HARD-INSIDE\n",
        "DONE\n",
    ] {
        assert!(stdout.contains(want), "{want:?} not in {stdout}");
    }
    assert!(!stdout.contains("SENTINEL"), "{stdout}");
    assert_eq!(std::fs::read(rw.join("out")).unwrap(), b"out\n");
    assert_eq!(std::fs::read(rw.join("in2")).unwrap(), b"from the host\n");
    assert!(!rw.join("hard").exists());
    assert!(!Path::new("/etc/capsem-escape").exists());
    assert_eq!(
        host.sentinel(),
        sentinel,
        "the sentinel beside the share changed"
    );
    assert_eq!(host.entries(), ["ro", "rw", "sentinel"]);
    assert_eq!(tree(&ro), ro_before, "the ro share changed on the host");
    assert_unmounted(&rw);
    fx.assert_nothing_left();
}

/// A file written through a shared mapping after its fd was closed is
/// only dirty pages in the guest's cache until the mapping goes: it still
/// reaches the host whole, although a temporary VM is now killed as soon
/// as the agent is done, without capsem-init's `sync` (FUSE writes the
/// pages back when the exiting process's mapping closes).
#[test]
fn a_mapping_written_at_the_very_end_reaches_the_host() {
    let fx = Fixture::new("share_mmap", B);
    let host = Host::new();
    let rw = host.dir("rw");
    let script = "\
import mmap, os
n = 1 << 20
fd = os.open('/work/mapped', os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, n)
m = mmap.mmap(fd, n)
os.close(fd)
m[:] = bytes(i % 251 for i in range(n))
print('MAPPED', flush=True)
os._exit(0)";
    let shares = [format!("{}:/work", rw.display())];
    let out = run_with(&fx, &shares, &["python3", "-c", script]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, "MAPPED\n");
    let want: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
    let got = std::fs::read(rw.join("mapped")).unwrap();
    assert_eq!(got.len(), want.len());
    assert!(got == want, "the mapped file's pages were lost on the host");
    assert_unmounted(&rw);
    fx.assert_nothing_left();
}

/// The write error itself is the kernel's read-only one.
#[test]
fn ro_write_fails_with_a_read_only_error() {
    let fx = Fixture::new("share_ro_error", B);
    let host = Host::new();
    let ro = host.dir("ro");
    let before = tree(&ro);
    let shares = [format!("{}:/ro:ro", ro.display())];
    let out = run_with(&fx, &shares, &["sh", "-c", "echo x > /ro/new"]);
    let (_, stderr) = text(&out);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    assert_eq!(tree(&ro), before);
    fx.assert_nothing_left();
}

#[test]
fn overlay_diff_and_adoption_on_a_persistent_vm() {
    let fx = Fixture::new("share_overlay", B);
    let host = Host::new();
    let ov = host.dir("ov");
    let rw = host.dir("rw");
    std::fs::write(ov.join("edit"), b"old\n").unwrap();
    std::fs::write(ov.join("del"), b"gone\n").unwrap();
    std::fs::write(ov.join("keep"), b"same\n").unwrap();
    std::fs::create_dir(ov.join("tree")).unwrap();
    std::fs::write(ov.join("tree/f"), b"f\n").unwrap();
    let before = tree(&ov);
    ok(
        &fx,
        &[
            "create",
            "pv",
            "-v",
            &format!("{}:/ov:overlay", ov.display()),
            "-v",
            &format!("{}:/rw", rw.display()),
        ],
    );
    let shares = &persist::inspect(&fx, "pv")["shares"];
    assert_eq!(shares[0]["mode"], "overlay");
    assert_eq!(shares[0]["host"], ov.to_str().unwrap());
    assert_eq!(shares[1]["mode"], "rw");
    let script = "echo new > /ov/edit && rm /ov/del && echo a > /ov/added && rm -r /ov/tree && cat /ov/edit /ov/keep";
    let out = persist::exec(&fx, "pv", &["sh", "-c", script], b"");
    assert_eq!(text(&out).0, "new\nsame\n", "{}", text(&out).1);
    let want = "A /ov/added\nD /ov/del\nC /ov/edit\nD /ov/tree\n";
    assert_eq!(ok(&fx, &["diff", "pv"]), want);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&fx, &["diff", "pv", "--json"])).unwrap();
    assert_eq!(
        json[0],
        serde_json::json!({"kind": "A", "path": "/ov/added"})
    );
    assert_eq!(json.as_array().unwrap().len(), 4);
    assert_eq!(tree(&ov), before, "the overlay share changed on the host");

    // A capsem-process crash: the guest (virtiofsd included) lives on, and
    // the next command adopts it with the shares still served.
    let guest = persist::guest_pids(&fx, "pv");
    assert_eq!(guest.len(), 4, "qemu, vhost-device-vsock, two virtiofsd");
    let pid = persist::process_pid(&fx, "pv");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Until its last thread is gone its ctl.sock still accepts (and then
    // resets) a connection: the crash is over only then.
    wait_until(
        std::time::Duration::from_secs(30),
        "the killed capsem-process to be gone",
        || !persist::running(pid),
    );
    let out = persist::exec(
        &fx,
        "pv",
        &["sh", "-c", "echo after > /rw/after && cat /ov/edit"],
        b"",
    );
    assert_eq!(text(&out).0, "new\n", "{}", text(&out).1);
    assert_eq!(std::fs::read(rw.join("after")).unwrap(), b"after\n");
    assert_eq!(persist::guest_pids(&fx, "pv"), guest, "the same guest");
    assert_eq!(persist::inspect(&fx, "pv")["adoptions"], 1);
    assert_eq!(ok(&fx, &["diff", "pv"]), want);

    // Stopped: a clear error; started again, the overlay kept its changes.
    ok(&fx, &["stop", "pv"]);
    let dir = persist::vm_dir(&fx, "pv");
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("fs-"))
        .collect();
    assert!(left.is_empty(), "virtiofsd files left: {left:?}");
    let out = persist::capsem(&fx, &["diff", "pv"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out).1.contains("stopped"), "{}", text(&out).1);
    ok(&fx, &["start", "pv"]);
    assert_eq!(ok(&fx, &["diff", "pv"]), want);
    ok(&fx, &["rm", "--force", "pv"]);
    assert_eq!(tree(&ov), before);
    assert_unmounted(&ov);
    fx.assert_nothing_left();
}

/// As uid 65534 with its own home: the file the guest writes belongs to
/// that user on the host. The programs under /root are not reachable for
/// it, so copies in a world-readable directory are named by their env
/// overrides, and the image's files get names in a world-readable directory.
#[test]
fn rw_files_belong_to_a_non_root_user() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test switches to uid 65534 and needs root"
    );
    let fx = Fixture::new("share_nonroot", B);
    let host = Host::new();
    let base = host.base.path();
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bins = host.dir("bin");
    let find = |name: &str| -> PathBuf {
        let env = match name {
            "vhost-device-vsock" => "CAPSEM_VHOST_VSOCK_BIN",
            _ => "CAPSEM_VIRTIOFSD_BIN",
        };
        std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap();
            Path::new(&home).join(".cargo/bin").join(name)
        })
    };
    for name in ["vhost-device-vsock", "virtiofsd"] {
        std::fs::copy(find(name), bins.join(name)).unwrap();
    }
    // capsem and capsem-process too: the checkout may be under a directory
    // only root can traverse (capsem finds capsem-process beside itself).
    for name in ["capsem", "capsem-process"] {
        let (from, to) = (bin_dir().join(name), bins.join(name));
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).unwrap();
        }
    }
    let home = host.dir("home");
    let share = host.dir("share");
    std::fs::write(share.join("in"), b"hi\n").unwrap();
    for d in [&home, &share] {
        std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap();
    }
    // The image's own directory may sit under one only root can traverse
    // (CI's is in a 0700 mktemp dir): its files get names in a reachable
    // one (hard links where the filesystem allows, else copies).
    let source = std::env::var_os("CAPSEM_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(capsem_tests::fixture::default_image_dir);
    let image = host.dir("image");
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let entry = entry.unwrap();
        if !entry.file_type().unwrap().is_file() {
            continue;
        }
        let to = image.join(entry.file_name());
        if std::fs::hard_link(entry.path(), &to).is_err() {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "env",
            "-i",
        ])
        .arg("PATH=/usr/bin:/bin")
        .arg(format!("HOME={}", home.display()))
        .arg(format!("CAPSEM_IMAGE_DIR={}", image.display()))
        .arg(format!(
            "CAPSEM_VHOST_VSOCK_BIN={}",
            bins.join("vhost-device-vsock").display()
        ))
        .arg(format!(
            "CAPSEM_VIRTIOFSD_BIN={}",
            bins.join("virtiofsd").display()
        ))
        .arg(bins.join("capsem"))
        .arg("--home")
        .arg(&home)
        .args(["run", "-v"])
        .arg(format!("{}:/work", share.display()))
        .args(["--", "sh", "-c", "cat /work/in; echo out > /work/out"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert_eq!(stdout, "hi\n");
    let meta = share.join("out").metadata().unwrap();
    assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
    assert_eq!(std::fs::read(share.join("out")).unwrap(), b"out\n");
    let vms = std::fs::read_dir(home.join("vms")).map_or(0, |d| d.count());
    assert_eq!(vms, 0, "the temporary VM's directory is left");
    fx.assert_nothing_left();
}
