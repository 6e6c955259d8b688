//! The network tests' pieces: a loopback HTTP/1.0 server (the only kind
//! of server a network test talks to), `net.jsonl` as JSON values, and
//! `curl` in the guest.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::persist::exec;
use crate::Fixture;

/// What [`Server`] answers.
pub const BODY: &str = "hello from the host's loopback";

/// A loopback HTTP/1.0 server: counts connections and keeps each Host.
/// It answers [`BODY`], or for `GET /big` the number of bytes it was
/// started with ([`Server::with_big`]; the relay benchmark's download).
#[derive(Debug)]
pub struct Server {
    pub port: u16,
    conns: Arc<AtomicUsize>,
    pub hosts: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// One request: the head read (bounded), the Host kept, the answer.
fn serve_one(mut stream: TcpStream, hosts: &Mutex<Vec<String>>, big: u64) {
    // A client that never finishes its head (a TLS hello here) cannot
    // hold the server past this.
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(20)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    if let Some(host) = text
        .lines()
        .find_map(|l| l.strip_prefix("Host: ").or(l.strip_prefix("host: ")))
    {
        hosts.lock().unwrap().push(host.trim().to_owned());
    }
    if !head.starts_with(b"GET /big ") {
        let reply = format!(
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{BODY}",
            BODY.len()
        );
        let _ = stream.write_all(reply.as_bytes());
        return;
    }
    let reply = format!("HTTP/1.0 200 OK\r\nContent-Length: {big}\r\n\r\n");
    if stream.write_all(reply.as_bytes()).is_err() {
        return;
    }
    let chunk = vec![b'x'; 1 << 16];
    let mut left = big;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if stream.write_all(&chunk[..n]).is_err() {
            return;
        }
        left -= n as u64;
    }
}

impl Server {
    pub fn start() -> Self {
        Self::with_big(0)
    }

    /// A server whose `GET /big` is `big` bytes.
    pub fn with_big(big: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let hosts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, h, s) = (conns.clone(), hosts.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("http-server".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    c.fetch_add(1, Ordering::SeqCst);
                    serve_one(stream, &h, big);
                }
            })
            .unwrap();
        Self {
            port,
            conns,
            hosts,
            stop,
            thread: Some(thread),
        }
    }

    pub fn conns(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept so the thread sees the stop and is joined.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A JSON-lines file as JSON values (none when it does not exist).
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `net.jsonl` as JSON values.
pub fn records(dir: &Path) -> Vec<serde_json::Value> {
    jsonl(&dir.join("net.jsonl"))
}

/// `capsem ARGS` with capsem-process's test hosts file
/// (`CAPSEM_NET_HOSTS=hosts`) and stdin closed; more `.env` may follow
/// before `.output()`.
pub fn capsem_with_hosts(fx: &Fixture, hosts: &Path, args: &[&str]) -> Command {
    let mut cmd = fx.capsem();
    cmd.args(args)
        .env("CAPSEM_NET_HOSTS", hosts)
        .stdin(Stdio::null());
    cmd
}

/// `curl` in the guest: (exit code, stdout, stderr).
pub fn curl(fx: &Fixture, name: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["--", "curl", "-sS", "--max-time", "20"];
    all.extend_from_slice(args);
    let out = exec(fx, name, &all, b"");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
