//! `capsem doctor` as a user runs it: the real binary, with every program it
//! looks for replaced by a fake script in a temporary directory, and an
//! environment that names nothing from this host.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// An executable `#!/bin/sh` script.
fn fake_bin(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

struct Sandbox {
    root: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        for d in ["home", "user", "bin", "fakes"] {
            fs::create_dir(root.path().join(d)).expect("mkdir");
        }
        let s = Self { root };
        fake_bin(&s.fakes(), "capsem-process", "exit 0");
        fake_bin(&s.fakes(), "capsem-agent", "exit 0");
        s
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p)
    }

    fn fakes(&self) -> PathBuf {
        self.path("fakes")
    }

    /// Runs `capsem --home <home> [args] doctor` with a cleared environment
    /// plus `env`; returns the exit code and stdout.
    fn doctor(&self, args: &[&str], env: &[(&str, PathBuf)]) -> (i32, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_capsem"));
        cmd.env_clear()
            .env("PATH", self.path("bin"))
            .env("HOME", self.path("user"))
            .env("CAPSEM_PROCESS_BIN", self.fakes().join("capsem-process"))
            .env("CAPSEM_AGENT_BIN", self.fakes().join("capsem-agent"))
            .arg("--home")
            .arg(self.path("home"))
            .args(args)
            .arg("doctor")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run capsem");
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.code().expect("capsem exited by a signal"),
            String::from_utf8(out.stdout).expect("utf-8 stdout"),
        )
    }
}

/// Checks the format of every line and returns `(status, what)` per check.
fn parse(out: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = out.lines().collect();
    let mut checks = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.starts_with("  fix: ") {
            assert!(i > 0, "{out}");
            continue;
        }
        // The status, left-aligned in 7 columns, then two spaces.
        let (status, rest) = (&line[..7], &line[7..]);
        assert!(
            ["ok     ", "warn   ", "missing"].contains(&status),
            "bad status in {line:?}"
        );
        let rest = rest
            .strip_prefix("  ")
            .unwrap_or_else(|| panic!("no two spaces after the status in {line:?}"));
        assert!(!rest.starts_with(' '), "{line:?}");
        let (what, detail) = rest
            .split_once(": ")
            .unwrap_or_else(|| panic!("no `what: ` in {line:?}"));
        let status = status.trim_end();
        assert!(!detail.is_empty(), "{line:?}");
        if status == "missing" {
            let next = lines.get(i + 1).copied().unwrap_or_default();
            assert!(
                next.starts_with("  fix: ") && next.len() > 7,
                "no fix after {line:?}:\n{out}"
            );
        }
        checks.push((status.to_owned(), what.to_owned()));
    }
    let whats: Vec<&str> = checks.iter().map(|(_, w)| w.as_str()).collect();
    assert_eq!(
        whats,
        [
            "home",
            "capsem-process",
            "capsem-agent",
            "qemu",
            "vhost-device-vsock",
            "virtiofsd",
            "accelerator",
            "guest image",
            "mkfs.ext4",
            "mmdebstrap",
            "mkfs.erofs",
            "vmm jail",
            "host limits"
        ],
        "{out}"
    );
    checks
}

fn status_of<'a>(checks: &'a [(String, String)], what: &str) -> &'a str {
    &checks
        .iter()
        .find(|(_, w)| w == what)
        .unwrap_or_else(|| panic!("no {what} check"))
        .0
}

fn line_of<'a>(out: &'a str, what: &str) -> &'a str {
    out.lines()
        .find(|l| l.contains(&format!("  {what}: ")))
        .unwrap_or_else(|| panic!("no {what} line in {out}"))
}

#[test]
fn missing_pieces_exit_1_with_a_fix_under_each() {
    let s = Sandbox::new();
    // A qemu that exists but fails, a vhost override naming nothing, and an
    // image directory that does not exist.
    let qemu = fake_bin(&s.fakes(), "qemu", "echo broken >&2; exit 1");
    let env = [
        ("CAPSEM_QEMU_BIN", qemu),
        ("CAPSEM_VHOST_VSOCK_BIN", s.path("fakes/absent-vhost")),
        ("CAPSEM_IMAGE_DIR", s.path("no-image")),
    ];
    let (code, out) = s.doctor(&[], &env);
    assert_eq!(code, 1, "{out}");
    let checks = parse(&out);
    for what in ["qemu", "vhost-device-vsock", "guest image"] {
        assert_eq!(status_of(&checks, what), "missing", "{out}");
    }
    for what in ["home", "capsem-process", "capsem-agent"] {
        assert_eq!(status_of(&checks, what), "ok", "{out}");
    }
    assert_ne!(status_of(&checks, "accelerator"), "missing", "{out}");
    assert!(
        out.contains("  fix: sudo apt-get install qemu-system-x86\n"),
        "{out}"
    );
    assert!(
        out.contains("  fix: cargo install --locked --version 0.3.0 vhost-device-vsock\n"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "  fix: images/build.sh {}\n",
            s.path("no-image").display()
        )),
        "{out}"
    );
    assert!(line_of(&out, "qemu").contains("(CAPSEM_QEMU_BIN)"), "{out}");

    // The same host for --vmm none: the VM's pieces are only informational.
    let (code, out) = s.doctor(&["--vmm", "none"], &env);
    assert_eq!(code, 0, "{out}");
    let checks = parse(&out);
    for what in ["qemu", "vhost-device-vsock", "guest image"] {
        assert_eq!(status_of(&checks, what), "warn", "{out}");
    }

    // And capsem-process itself missing is missing for both backends.
    let (code, out) = s.doctor(
        &["--vmm", "none"],
        &[("CAPSEM_PROCESS_BIN", s.path("fakes/none-here"))],
    );
    assert_eq!(code, 1, "{out}");
    assert_eq!(status_of(&parse(&out), "capsem-process"), "missing");
}

#[test]
fn everything_present_exits_0() {
    let s = Sandbox::new();
    let qemu = fake_bin(
        &s.fakes(),
        "qemu",
        "echo 'QEMU emulator version 9.9.9 (fake)'; echo 'Copyright'",
    );
    // Found on PATH, as capsem-process would find it.
    fake_bin(
        &s.path("bin"),
        "vhost-device-vsock",
        "echo 'vhost-device-vsock 0.3.0'",
    );
    let image = s.path("home/images/default");
    fs::create_dir_all(&image).unwrap();
    fs::write(image.join("vmlinuz"), b"kernel").unwrap();
    fs::write(image.join("initramfs.cpio.gz"), b"initramfs").unwrap();
    fs::write(image.join("rootfs.erofs"), b"rootfs").unwrap();
    fs::write(
        image.join("manifest.json"),
        br#"{"format": 1, "kernel": {"package": "linux-image-x", "version": "1", "release": "6.1.0-fake-amd64"}}"#,
    )
    .unwrap();
    let (code, out) = s.doctor(&[], &[("CAPSEM_QEMU_BIN", qemu)]);
    assert_eq!(code, 0, "{out}");
    let checks = parse(&out);
    assert!(checks.iter().all(|(st, _)| st != "missing"), "{out}");
    assert!(
        line_of(&out, "qemu").ends_with("(QEMU emulator version 9.9.9 (fake))"),
        "{out}"
    );
    assert!(
        line_of(&out, "vhost-device-vsock").contains(&format!(
            "{}/vhost-device-vsock (vhost-device-vsock 0.3.0)",
            s.path("bin").display()
        )),
        "{out}"
    );
    assert!(
        line_of(&out, "guest image").ends_with(": kernel 6.1.0-fake-amd64, Debian root"),
        "{out}"
    );
    assert_eq!(status_of(&checks, "home"), "ok", "{out}");
    assert_eq!(status_of(&checks, "vmm jail"), "ok", "{out}");
    // Either where the limits go, or (warn) one line on why they cannot.
    let limits = line_of(&out, "host limits");
    assert!(limits.contains("cgroup"), "{out}");
}
