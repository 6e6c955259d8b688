//! Exec mode end to end: a fake host (Unix listeners at `<dir>/vsock.sock_5000`,
//! `_5001`, which must stay unused, and `_5005`) and the real agent binary
//! with `CAPSEM_MODE=exec`.
//!
//! Every agent runs inside a guard whose Drop terminates and reaps it even
//! when a test fails; every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsem_proto::exec::{ExecStream, ExecToHost, HostToExec};
use capsem_proto::frame::{ExecHost, Host};
use capsem_proto::guest::{GuestToHost, HostToGuest, PROTOCOL_VERSION};
use capsem_proto::Codec;

const TOKEN: &str = "exec-token";
const LONG: Duration = Duration::from_secs(20);

fn readable(fd: std::os::fd::BorrowedFd<'_>, until: Instant) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let left = until.saturating_duration_since(Instant::now());
    let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the call.
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

struct Guard(Option<Child>);

impl Guard {
    fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if let Some(s) = self.0.as_mut()?.try_wait().unwrap() {
                self.0 = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            // SAFETY: signals our own unreaped child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            if self.wait(Duration::from_secs(10)).is_none() {
                if let Some(c) = self.0.as_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
        }
    }
}

struct Session {
    _dir: tempfile::TempDir,
    agent: Guard,
    ctl: UnixStream,
    ctl_codec: Codec<Host>,
    exec: UnixStream,
    exec_codec: Codec<ExecHost>,
    hello: GuestToHost,
}

fn accept(l: &UnixListener) -> UnixStream {
    assert!(
        readable(l.as_fd(), Instant::now() + LONG),
        "no connection in time"
    );
    l.accept().unwrap().0
}

impl Session {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let listen = |port: u32| UnixListener::bind(dir.path().join(format!("vsock.sock_{port}")));
        let (ctl_l, term_l, exec_l) = (
            listen(5000).unwrap(),
            listen(5001).unwrap(),
            listen(5005).unwrap(),
        );
        let child = Command::new(env!("CARGO_BIN_EXE_capsem-agent"))
            .arg("--transport")
            .arg(format!("unix:{}", dir.path().join("vsock.sock").display()))
            .env("CAPSEM_TOKEN", TOKEN)
            .env("CAPSEM_MODE", "exec")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let agent = Guard(Some(child));
        let mut ctl = accept(&ctl_l);
        let mut ctl_codec = Codec::<Host>::new();
        let hello = recv_ctl(&mut ctl, &mut ctl_codec).expect("hello");
        hello.check_hello(TOKEN).unwrap();
        let ack = HostToGuest::HelloAck {
            version: PROTOCOL_VERSION,
            generation: 1,
        };
        ctl.write_all(&Codec::<Host>::encode(&ack).unwrap())
            .unwrap();
        let exec = accept(&exec_l);
        // Protocol 3: exec mode opens no terminal connection.
        assert!(
            !readable(term_l.as_fd(), Instant::now()),
            "exec mode connected the terminal port"
        );
        let mut session = Self {
            _dir: dir,
            agent,
            ctl,
            ctl_codec,
            exec,
            exec_codec: Codec::new(),
            hello,
        };
        // Every exec connection opens with the session token.
        assert_eq!(
            session.recv(),
            Some(ExecToHost::Hello {
                token: TOKEN.into()
            })
        );
        session
    }

    fn send(&mut self, msg: &HostToExec) {
        self.exec
            .write_all(&Codec::<ExecHost>::encode(msg).unwrap())
            .unwrap();
    }

    fn recv(&mut self) -> Option<ExecToHost> {
        let until = Instant::now() + LONG;
        let mut buf = [0u8; 65536];
        loop {
            if let Some(m) = self.exec_codec.next_message().unwrap() {
                return Some(m);
            }
            if !readable(self.exec.as_fd(), until) {
                return None;
            }
            let n = self.exec.read(&mut buf).unwrap();
            if n == 0 {
                return None;
            }
            self.exec_codec.feed(&buf[..n]).unwrap();
        }
    }

    /// Output per stream until `Exit`, and the `Exit`.
    fn collect(&mut self) -> (Vec<u8>, Vec<u8>, ExecToHost) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match self.recv().expect("a message before the exit") {
                ExecToHost::Output {
                    stream: ExecStream::Stdout,
                    data,
                } => out.extend(data),
                ExecToHost::Output {
                    stream: ExecStream::Stderr,
                    data,
                } => err.extend(data),
                exit @ ExecToHost::Exit { .. } => return (out, err, exit),
                hello @ ExecToHost::Hello { .. } => panic!("{hello:?} after the first message"),
            }
        }
    }

    /// Sends Shutdown; the agent exits 0.
    fn shutdown(mut self) {
        self.ctl
            .write_all(&Codec::<Host>::encode(&HostToGuest::Shutdown).unwrap())
            .unwrap();
        let status = self.agent.wait(LONG).expect("the agent exits");
        assert!(status.success(), "{status:?}");
    }
}

fn recv_ctl(ctl: &mut UnixStream, codec: &mut Codec<Host>) -> Option<GuestToHost> {
    let until = Instant::now() + LONG;
    let mut buf = [0u8; 4096];
    loop {
        if let Some(m) = codec.next_message().unwrap() {
            return Some(m);
        }
        if !readable(ctl.as_fd(), until) {
            return None;
        }
        let n = ctl.read(&mut buf).unwrap();
        if n == 0 {
            return None;
        }
        codec.feed(&buf[..n]).unwrap();
    }
}

fn start(argv: &[&str]) -> HostToExec {
    HostToExec::Start {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        workdir: None,
        timeout_ms: None,
        tty: None,
    }
}

#[test]
fn hello_has_no_shell_and_pings_are_answered() {
    let mut s = Session::start();
    assert!(matches!(s.hello, GuestToHost::Hello { shell_pid: 0, .. }));
    s.ctl
        .write_all(&Codec::<Host>::encode(&HostToGuest::Ping { seq: 9 }).unwrap())
        .unwrap();
    assert_eq!(
        recv_ctl(&mut s.ctl, &mut s.ctl_codec),
        Some(GuestToHost::Pong { seq: 9 })
    );
    s.send(&start(&["true"]));
    let (_, _, exit) = s.collect();
    assert!(
        matches!(
            exit,
            ExecToHost::Exit {
                exit_code: Some(0),
                ..
            }
        ),
        "{exit:?}"
    );
    s.shutdown();
}

#[test]
fn stdin_with_eof_and_counted_output() {
    let mut s = Session::start();
    s.send(&start(&["cat"]));
    s.send(&HostToExec::Stdin {
        data: b"hello\0world".to_vec(),
    });
    s.send(&HostToExec::StdinEof);
    let (out, err, exit) = s.collect();
    assert_eq!(out, b"hello\0world");
    assert!(err.is_empty());
    assert_eq!(
        exit,
        ExecToHost::Exit {
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            stdout_bytes: 11,
            stderr_bytes: 0
        }
    );
    s.shutdown();
}

#[test]
fn host_signal_reaches_the_group() {
    let mut s = Session::start();
    s.send(&start(&["sh", "-c", "echo ready; sleep 1000"]));
    match s.recv() {
        Some(ExecToHost::Output { data, .. }) => assert_eq!(data, b"ready\n"),
        other => panic!("{other:?}"),
    }
    s.send(&HostToExec::Signal {
        signal: libc::SIGTERM,
    });
    let (_, _, exit) = s.collect();
    assert!(
        matches!(
            exit,
            ExecToHost::Exit {
                signal: Some(15),
                timed_out: false,
                ..
            }
        ),
        "{exit:?}"
    );
    s.shutdown();
}

#[test]
fn a_denied_variable_is_refused_by_the_agent_too() {
    let mut s = Session::start();
    s.send(&HostToExec::Start {
        argv: vec!["true".into()],
        env: vec![("LD_PRELOAD".into(), "/x.so".into())],
        workdir: None,
        timeout_ms: None,
        tty: None,
    });
    let (out, err, exit) = s.collect();
    assert!(out.is_empty());
    assert!(String::from_utf8_lossy(&err).contains("LD_PRELOAD"));
    assert!(
        matches!(
            exit,
            ExecToHost::Exit {
                exit_code: Some(125),
                ..
            }
        ),
        "{exit:?}"
    );
    s.shutdown();
}

#[test]
fn timeout_is_reported() {
    let mut s = Session::start();
    s.send(&HostToExec::Start {
        argv: vec!["sleep".into(), "30".into()],
        env: vec![],
        workdir: None,
        timeout_ms: Some(200),
        tty: None,
    });
    let (_, _, exit) = s.collect();
    assert!(
        matches!(
            exit,
            ExecToHost::Exit {
                signal: Some(15),
                timed_out: true,
                ..
            }
        ),
        "{exit:?}"
    );
    s.shutdown();
}
