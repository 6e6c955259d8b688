//! The network tests' loopback servers (`tests/servers/serve.py`: static
//! files, TLS, git's smart HTTP, a PEP 503 index) as child processes that
//! print their port, killed and reaped on drop; and the test certificate
//! authority (`openssl`), made per test in its own directory.

// Test helpers: a failed step panics with its cause, as in a #[test].
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// One `serve.py` on a loopback port.
#[derive(Debug)]
pub struct PyServer {
    child: Child,
    pub port: u16,
}

impl PyServer {
    /// `serve.py MODE ARGS...`; waits for its port line.
    pub fn start(mode: &str, args: &[&Path]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("servers/serve.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(mode)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 serve.py");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let port = match line.trim().parse() {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("serve.py {mode} printed no port: {line:?}");
            }
        };
        Self { child, port }
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A certificate authority and one server certificate for `name`.
#[derive(Debug)]
pub struct TestCa {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `program ARGS` in `dir`, stdin closed, failing the test on an error.
fn run_in(dir: &Path, mut cmd: Command, args: &[&str]) {
    let out = cmd
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn a test tool");
    assert!(
        out.status.success(),
        "{:?} {args:?}: {}",
        cmd.get_program(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn openssl(dir: &Path, args: &[&str]) {
    run_in(dir, Command::new("openssl"), args);
}

impl TestCa {
    pub fn make(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let rsa = ["-newkey", "rsa:2048", "-nodes"];
        let subj_ca = "/CN=capsem test CA";
        let mut ca = vec!["req", "-x509"];
        ca.extend(rsa);
        ca.extend([
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", subj_ca,
        ]);
        openssl(dir, &ca);
        let subj = format!("/CN={name}");
        let mut csr = vec!["req"];
        csr.extend(rsa);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            &subj,
        ]);
        openssl(dir, &csr);
        std::fs::write(dir.join("ext"), format!("subjectAltName=DNS:{name}\n")).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext",
            ],
        );
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }
}

/// `git`, in `dir`, failing the test on an error.
pub fn git(dir: &Path, args: &[&str]) {
    let mut git = Command::new("git");
    git.args(["-c", "user.email=t@capsem", "-c", "user.name=capsem-test"]);
    run_in(dir, git, args);
}

/// A bare repository `ROOT/NAME.git` with one commit holding `file`
/// (`content`); returns the commit's hash.
pub fn bare_repo(root: &Path, name: &str, file: &str, content: &str) -> String {
    let work = root.join(format!("{name}.work"));
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q"]);
    std::fs::write(work.join(file), content).unwrap();
    git(&work, &["add", file]);
    git(&work, &["commit", "-qm", "the test's commit"]);
    let bare = format!("{name}.git");
    git(
        root,
        &["clone", "-q", "--bare", &format!("{name}.work"), &bare],
    );
    let out = Command::new("git")
        .current_dir(&work)
        .args(["rev-parse", "HEAD"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
