//! `capsem cp` scenarios, shared by the no-VM and real-VM suites: a tree
//! (a symlink, an executable, a 50 MiB random file, set mtimes) in and back
//! out byte-identical; `-` both ways; Docker's DST rules; the errors and
//! their exit codes; and a guest whose `tar` is replaced by a program
//! that writes hostile archives, none of which writes outside DST.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::fixture::{Backend, Fixture};
use crate::persist::{capsem, exec, ok};

/// A 50 MiB file of random bytes (from the kernel; no seed to agree on).
const BIG: usize = 50 << 20;

/// The source tree: `run.sh` (0755), `sub/data` (0600), `link ->
/// sub/data`, `big` (50 MiB random), with fixed mtimes.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("sub")).unwrap();
    fs::write(root.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(root.join("sub/data"), "data\n").unwrap();
    fs::set_permissions(root.join("sub/data"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("sub/data", root.join("link")).unwrap();
    let mut big = vec![0u8; BIG];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut big))
        .unwrap();
    fs::write(root.join("big"), &big).unwrap();
    for (p, t) in [
        ("run.sh", 1_000_000),
        ("sub/data", 1_100_000),
        ("big", 1_200_000),
    ] {
        let status = Command::new("touch")
            .arg("-d")
            .arg(format!("@{t}"))
            .arg(root.join(p))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let status = Command::new("touch")
        .args(["-h", "-d", "@1300000"])
        .arg(root.join("link"))
        .status()
        .unwrap();
    assert!(status.success());
}

/// Every path under `root` with its kind, mode, size, link target, mtime
/// (directories' mtimes included) and contents.
fn describe(root: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let m = fs::symlink_metadata(&p).unwrap();
        let what = if m.is_symlink() {
            format!("link {:?} mtime {}", fs::read_link(&p).unwrap(), m.mtime())
        } else if m.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            stack.extend(names.into_iter().map(|n| rel.join(n)));
            format!("dir {:o} mtime {}", m.mode() & 0o7777, m.mtime())
        } else {
            let data = fs::read(&p).unwrap();
            let sum: u64 = data.iter().enumerate().fold(0u64, |a, (i, b)| {
                a.wrapping_mul(31).wrapping_add(*b as u64 ^ i as u64)
            });
            format!(
                "file {:o} size {} sum {sum:x} mtime {}",
                m.mode() & 0o7777,
                m.len(),
                m.mtime()
            )
        };
        out.push((rel, what));
    }
    out.sort();
    out
}

fn cp(fx: &Fixture, src: &str, dst: &str) -> Output {
    capsem(fx, &["cp", src, dst])
}

fn cp_ok(fx: &Fixture, src: &str, dst: &str) {
    let out = cp(fx, src, dst);
    assert!(
        out.status.success(),
        "capsem cp {src} {dst} failed ({:?}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
}

/// One line on stderr, starting `capsem: `, that contains `needle`.
fn one_line(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(
        err.starts_with("capsem: ") && err.ends_with('\n'),
        "{err:?}"
    );
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.contains(needle), "{needle:?} not in {err:?}");
}

fn guest_sh(fx: &Fixture, script: &str) -> String {
    let out = exec(fx, "box", &["--", "sh", "-c", script], b"");
    assert!(out.status.success(), "{script}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The tree in and out of a persistent VM, byte-identical with modes,
/// links and mtimes; Docker's DST rules; `-` both ways; the errors.
pub fn round_trip(backend: Backend) {
    let fx = Fixture::new("cp_round_trip", backend);
    let work = tempfile::tempdir_in("/tmp").unwrap();
    let src = work.path().join("tree");
    make_tree(&src);
    let want = describe(&src);
    ok(&fx, &["create", "box"]);
    // The guest's tmp may be the host's (`--vmm none`): a directory of
    // this test's own.
    let g = format!("/tmp/capsem-cp-{}", std::process::id());
    guest_sh(&fx, &format!("rm -rf {g}; mkdir {g}"));

    // A missing DST is created as the directory; back out likewise.
    cp_ok(&fx, host(&src), &format!("box:{g}/in"));
    let seen = guest_sh(
        &fx,
        &format!("cd {g}/in && stat -c '%n %a %s %Y' run.sh sub/data big && readlink link"),
    );
    assert_eq!(
        seen,
        format!("run.sh 755 19 1000000\nsub/data 600 5 1100000\nbig 644 {BIG} 1200000\nsub/data\n")
    );
    let back = work.path().join("back");
    cp_ok(&fx, &format!("box:{g}/in"), host(&back));
    assert_eq!(describe(&back), want);

    // An existing directory receives SRC under its name; SRC/. its contents.
    let into = work.path().join("into");
    fs::create_dir(&into).unwrap();
    cp_ok(&fx, &format!("box:{g}/in"), host(&into));
    assert_eq!(describe(&into.join("in")), want);
    let contents = work.path().join("contents");
    fs::create_dir(&contents).unwrap();
    cp_ok(&fx, &format!("box:{g}/in/sub/."), host(&contents));
    assert_eq!(fs::read(contents.join("data")).unwrap(), b"data\n");
    // One file, onto a new name and over an existing file.
    let one = work.path().join("one");
    cp_ok(&fx, &format!("box:{g}/in/run.sh"), host(&one));
    cp_ok(
        &fx,
        host(&src.join("sub/data")),
        &format!("box:{g}/in/run.sh"),
    );
    assert_eq!(guest_sh(&fx, &format!("cat {g}/in/run.sh")), "data\n");
    assert_eq!(fs::metadata(&one).unwrap().mode() & 0o7777, 0o755);

    // `-`: a tar stream on stdin into a guest directory, and on stdout.
    let tar_in = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(6);
        h.set_mode(0o640);
        h.set_mtime(1_400_000);
        h.set_cksum();
        b.append_data(&mut h, "streamed", &b"piped\n"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let mut cmd = fx.capsem();
    cmd.args(["cp", "-", &format!("box:{g}")]);
    let out = with_stdin(cmd, &tar_in);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        guest_sh(
            &fx,
            &format!("stat -c '%a %Y' {g}/streamed; cat {g}/streamed")
        ),
        "640 1400000\npiped\n"
    );
    let out = cp(&fx, &format!("box:{g}/in/sub"), "-");
    assert!(out.status.success(), "{out:?}");
    let mut names = Vec::new();
    for e in tar::Archive::new(&out.stdout[..]).entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        names.push((name.trim_end_matches('/').to_owned(), data));
    }
    assert_eq!(
        names,
        vec![
            ("sub".into(), vec![]),
            ("sub/data".into(), b"data\n".to_vec())
        ]
    );

    // Errors: one line each, 1 for a failed copy, 125 for usage.
    one_line(
        &cp(
            &fx,
            &format!("box:{g}/nothing"),
            host(&work.path().join("x")),
        ),
        1,
        &format!("box:{g}/nothing: Cannot stat: No such file or directory"),
    );
    one_line(
        &cp(&fx, host(&src), &format!("box:{g}/no/such/dir")),
        1,
        "no such directory",
    );
    one_line(
        &cp(&fx, host(&work.path().join("absent")), &format!("box:{g}")),
        1,
        "absent",
    );
    one_line(
        &cp(&fx, host(&src), &format!("box:{g}/in/run.sh")),
        1,
        "directory to a file",
    );
    one_line(
        &cp(&fx, &format!("box:{g}/in"), host(&one)),
        1,
        "directory to a file",
    );
    one_line(
        &cp(&fx, "box:/a", "box:/b"),
        125,
        "exactly one of SRC and DST",
    );
    one_line(
        &cp(&fx, host(&src), host(&one)),
        125,
        "exactly one of SRC and DST",
    );
    one_line(
        &cp(&fx, host(&src), "nobox:/tmp"),
        125,
        "no VM named \"nobox\"",
    );
    assert!(!work.path().join("x").exists());

    guest_sh(&fx, &format!("rm -rf {g}"));
    ok(&fx, &["stop", "box"]);
    one_line(&cp(&fx, host(&src), "box:/tmp"), 125, "is stopped");
    one_line(&cp(&fx, "box:/etc/hostname", host(&one)), 125, "is stopped");
    ok(&fx, &["rm", "box"]);
    fx.assert_nothing_left();
}

fn with_stdin(mut cmd: Command, input: &[u8]) -> Output {
    use std::io::Write;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::Builder::new()
        .name("cp-stdin".into())
        .spawn(move || {
            let _ = stdin.write_all(&input);
        })
        .unwrap();
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// The guest's `tar`, replaced: a python3 program that writes the archive
/// `/tmp/capsem-attack` names, whatever it is asked.
const HOSTILE_TAR: &str = r#"#!/usr/bin/python3
import io, sys, tarfile
mode, arg = open('/tmp/capsem-attack').read().split('\n')[:2]
out = tarfile.open(fileobj=sys.stdout.buffer, mode='w|', format=tarfile.GNU_FORMAT)
def add(name, kind=tarfile.REGTYPE, data=b'', link=''):
    t = tarfile.TarInfo(name); t.type = kind; t.size = len(data); t.linkname = link; t.mode = 0o644
    out.addfile(t, io.BytesIO(data))
top = tarfile.TarInfo('top'); top.type = tarfile.DIRTYPE; top.mode = 0o755
out.addfile(top)
if mode == 'dotdot': add('top/../../escape-dotdot', data=b'pwned')
if mode == 'absolute': add(arg, data=b'pwned')
if mode == 'symlink':
    add('top/link', tarfile.SYMTYPE, link=arg)
    add('top/link/pwned', data=b'pwned')
if mode == 'hardlink': add('top/hard', tarfile.LNKTYPE, link=arg)
if mode == 'longname': add('top/' + 'a' * (3 << 20), data=b'x')
out.close()
"#;

/// A hostile guest: its `tar` writes `..` names, absolute names, a symlink
/// then a write through it, a hard link out, a 3 MiB long name. Each copy
/// out fails with one line and exit 1; nothing appears outside DST.
pub fn hostile_guest_stream(backend: Backend) {
    let fx = Fixture::new("cp_hostile", backend);
    let work = tempfile::tempdir_in("/tmp").unwrap();
    let outside = work.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), "untouched").unwrap();
    let absolute = work.path().join("abs-escape");
    ok(&fx, &["create", "box"]);
    let out = exec(
        &fx,
        "box",
        &[
            "--",
            "sh",
            "-c",
            "cat > /usr/local/bin/tar && chmod 755 /usr/local/bin/tar",
        ],
        HOSTILE_TAR.as_bytes(),
    );
    assert!(out.status.success(), "{out:?}");
    let cases = [
        ("dotdot", String::new(), "outside what was asked for"),
        (
            "absolute",
            host(&absolute).to_owned(),
            "outside what was asked for",
        ),
        (
            "symlink",
            host(&outside).to_owned(),
            "in the way of a directory",
        ),
        (
            "hardlink",
            host(&outside.join("victim")).to_owned(),
            "outside what was asked",
        ),
        ("longname", String::new(), "tar stream is invalid"),
    ];
    for (mode, arg, needle) in cases {
        let out = exec(
            &fx,
            "box",
            &["--", "sh", "-c", "cat > /tmp/capsem-attack"],
            format!("{mode}\n{arg}\n").as_bytes(),
        );
        assert!(out.status.success(), "{out:?}");
        let dst = work.path().join(format!("dst-{mode}"));
        fs::create_dir(&dst).unwrap();
        one_line(&cp(&fx, "box:/anything/top", host(&dst)), 1, needle);
        // Only dst-*/ and what was there before, untouched.
        let mut around: Vec<String> = fs::read_dir(work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("dst-"))
            .collect();
        around.sort();
        assert_eq!(around, ["outside"], "{mode}");
        let names: Vec<_> = fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["victim"], "{mode}");
        assert_eq!(
            fs::read(outside.join("victim")).unwrap(),
            b"untouched",
            "{mode}"
        );
        assert_eq!(
            fs::metadata(outside.join("victim")).unwrap().nlink(),
            1,
            "{mode}"
        );
    }
    let out = exec(
        &fx,
        "box",
        &["--", "rm", "/usr/local/bin/tar", "/tmp/capsem-attack"],
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    // The VM is unharmed: a real copy still works.
    let back = work.path().join("hostname");
    cp_ok(&fx, "box:/etc/hostname", host(&back));
    assert!(back.is_file());
    ok(&fx, &["rm", "--force", "box"]);
    fx.assert_nothing_left();
}
