//! A `docker-registry` (Debian's package) on a loopback port, for the
//! OCI image tests of capsem-cli and of this crate: started with plain
//! HTTP (optionally with HTTP Basic auth), pushed to with a minimal
//! HTTP/1.1 client, its blob GETs counted from its log, and killed and
//! reaped on drop.

// Test helpers: a failed step panics with its cause, as in a #[test].
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An image as blobs: its layers, its config and its manifest.
pub trait PushImage {
    fn blobs(&self) -> &[Vec<u8>];
    fn config(&self) -> &[u8];
    fn manifest(&self) -> &[u8];
}

/// (status, lowercased headers, body).
pub type Response = (u16, Vec<(String, String)>, Vec<u8>);

/// A `docker-registry` on a loopback port, killed and reaped on drop.
#[derive(Debug)]
pub struct Registry {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    /// The `Authorization` header value the test's own requests send.
    authorization: Option<String>,
}

/// The test user of [`Registry::start_with_basic_auth`]: its name, its
/// password, and the password's bcrypt hash (cost 4: quick to check).
pub const TEST_USER: &str = "tester";
pub const TEST_PASSWORD: &str = "capsem-test-pw";
const TEST_BCRYPT: &str = "$2b$04$HzQE1D/.LCciEK9e40PEqO6nHhekzLQl.n99h9W9biHQIE/FRYjAy";
/// base64 of `tester:capsem-test-pw`.
pub const TEST_BASIC: &str = "dGVzdGVyOmNhcHNlbS10ZXN0LXB3";

impl Registry {
    pub fn start() -> Self {
        Self::start_inner(false)
    }

    /// A registry that wants HTTP Basic credentials ([`TEST_USER`]).
    pub fn start_with_basic_auth() -> Self {
        Self::start_inner(true)
    }

    fn start_inner(basic_auth: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  formatter: text\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("storage").display()
        );
        let mut config = config;
        if basic_auth {
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{TEST_USER}:{TEST_BCRYPT}\n")).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: capsem-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let mut r = Self {
            child: Some(child),
            addr,
            dir,
            authorization: basic_auth.then(|| format!("Basic {TEST_BASIC}")),
        };
        // Wait until it answers /v2/ (or died).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((status, _, _)) = r.request("GET", "/v2/", &[], &[]) {
                assert_eq!(status, 200);
                break;
            }
            if let Some(st) = r.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("docker-registry exited {st}: {}", r.log());
            }
            assert!(Instant::now() < deadline, "registry not up: {}", r.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// GET requests for blobs the registry has logged so far.
    pub fn blob_gets(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("GET") && l.contains("/blobs/sha256:"))
            .count()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// One HTTP/1.1 request; (status, headers, body).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut s = TcpStream::connect(self.addr)?;
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(a) = &self.authorization {
            req.push_str(&format!("Authorization: {a}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        s.write_all(body)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)?;
        let end = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("no header end"))?;
        let head = String::from_utf8_lossy(&resp[..end]).into_owned();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other("bad status line"))?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Ok((status, headers, resp[end + 4..].to_vec()))
    }

    fn push_blob(&self, repo: &str, blob: &[u8]) {
        let (status, headers, _) = self
            .request("POST", &format!("/v2/{repo}/blobs/uploads/"), &[], &[])
            .unwrap();
        assert_eq!(status, 202);
        let loc = headers
            .iter()
            .find(|(k, _)| k == "location")
            .unwrap()
            .1
            .clone();
        let loc = loc
            .strip_prefix(&format!("http://{}", self.addr))
            .unwrap_or(&loc)
            .to_owned();
        let sep = if loc.contains('?') { '&' } else { '?' };
        let (status, _, body) = self
            .request(
                "PUT",
                &format!("{loc}{sep}digest={}", capsem_image::Digest::of(blob)),
                &[("Content-Type", "application/octet-stream")],
                blob,
            )
            .unwrap();
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    }

    /// Pushes `img` as `repo:tag`.
    pub fn push(&self, repo: &str, tag: &str, img: &impl PushImage) {
        for b in img.blobs().iter().chain([&img.config().to_vec()]) {
            self.push_blob(repo, b);
        }
        let (status, _, body) = self
            .request(
                "PUT",
                &format!("/v2/{repo}/manifests/{tag}"),
                &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
                img.manifest(),
            )
            .unwrap();
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    }

    /// The file the registry serves a blob from.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Kills and reaps the registry; returns its pid.
    pub fn stop(&mut self) -> Option<u32> {
        let mut child = self.child.take()?;
        let pid = child.id();
        let _ = child.kill();
        let _ = child.wait();
        Some(pid)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a process with this pid exists (after it was reaped: no).
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
