//! Runs the real `capsem-process` with `--vmm none` and a stub agent (see
//! `common`). The test itself plays the agent on `vsock.sock_5000`/`_5001`
//! and the CLI on `ctl.sock`.

// clippy.toml allows unwrap in #[test] fns only; the helpers here are test code too.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use capsem_proto::frame::Guest;
use capsem_proto::guest::{GuestToHost, HostToGuest, PROTOCOL_VERSION};
use capsem_proto::ipc::{ClientToProcess, ProcessToClient};
use capsem_proto::Codec;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use common::*;

#[tokio::test]
async fn ready_after_the_first_bridge_with_private_modes() {
    let mut vm = Vm::start(&[]);
    let token = vm.token();
    assert_eq!(token.len(), 32);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    let args = vm.file("args");
    assert_eq!(
        args.trim(),
        format!(
            "--transport unix:{} --vm-id test-vm",
            vm.dir.join("vsock.sock").display()
        )
    );
    assert_eq!(mode(&vm.dir), 0o700);
    assert_eq!(mode(&vm.scratch), 0o700);
    assert_eq!(mode(&vm.sock("ctl.sock")), 0o600);
    let before = status(&vm).await;
    assert_eq!((before.generation, before.bridged), (0, false));

    let guest = FakeGuest::connect(&vm, &token, 1).await;
    assert_eq!(vm.ready_line().await, "ready\n");
    vm.wait_log("guest connected generation=1 agent_connects=1")
        .await;
    guest
        .send(&GuestToHost::BootTimings {
            stages: vec![capsem_proto::guest::BootStage {
                name: "init".into(),
                micros: 1000,
            }],
        })
        .await;
    vm.wait_log("boot timings: init=1000us").await;
    let s = status(&vm).await;
    assert_eq!(s.vm_id, "test-vm");
    assert_eq!((s.generation, s.agent_connects), (1, 1));
    assert_eq!(s.shell_pid, Some(4242));
    assert_eq!(s.guest_pid, Some(vm.pid_file("agent.pid") as u32));
    assert!(s.bridged && !s.attached);
}

#[tokio::test]
async fn bad_hellos_close_only_their_connection_then_a_new_hello_rekeys() {
    let mut vm = Vm::start(&[]);
    let token = vm.token();
    let mut guest = FakeGuest::connect(&vm, &token, 1).await;
    assert_eq!(vm.ready_line().await, "ready\n");
    let mut cli = Cli::attach(&vm).await;

    let wrong = Codec::<Guest>::encode(&GuestToHost::Hello {
        version: PROTOCOL_VERSION,
        token: "0".repeat(32),
        connects: 9,
        shell_pid: 1,
    })
    .unwrap();
    let cases: Vec<(Vec<u8>, bool, &str)> = vec![
        (
            wrong,
            false,
            "control connection rejected: wrong session token",
        ),
        (
            vec![0, 0, 0, 3, 0xc1, 0xc1, 0xc1],
            false,
            "control connection rejected: invalid frame: invalid message payload",
        ),
        (
            vec![0xff, 0xff, 0xff, 0xff],
            false,
            "control connection rejected: invalid frame: frame length 4294967295 exceeds",
        ),
        (
            vec![0, 0, 0, 10, 1, 2],
            true,
            "control connection rejected: connection closed inside the hello frame",
        ),
    ];
    for (i, (bytes, close, reason)) in cases.into_iter().enumerate() {
        let mut bad = UnixStream::connect(vm.sock("vsock.sock_5000"))
            .await
            .unwrap();
        bad.write_all(&bytes).await.unwrap();
        if close {
            bad.shutdown().await.unwrap();
        }
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(DEADLINE, bad.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "case {i}: connection not closed");
        vm.wait_log(reason).await;
        // The session still works.
        let line = format!("still-alive-{i}\n");
        guest.output(line.as_bytes()).await;
        cli.output_until(line.as_bytes()).await;
    }
    let log = vm.log();
    assert_eq!(
        log.matches("control connection rejected").count(),
        4,
        "{log}"
    );

    // A terminal connection nobody asked for (its hello names a generation
    // that was never acknowledged) is closed.
    let mut stray = UnixStream::connect(vm.sock("vsock.sock_5001"))
        .await
        .unwrap();
    let stray_hello = capsem_proto::terminal::TermToHost::Hello {
        token: token.clone(),
        generation: 99,
    };
    stray
        .write_all(&Codec::<capsem_proto::frame::TermGuest>::encode(&stray_hello).unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(DEADLINE, stray.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    vm.wait_log("terminal connection rejected").await;

    // A valid hello re-keys: the old connections close, the new ones work.
    let mut second = FakeGuest::connect(&vm, &token, 2).await;
    while let Some(msg) = guest.next().await {
        assert!(matches!(msg, HostToGuest::Resize { .. }), "{msg:?}");
    }
    guest.terminal_closed().await;
    vm.wait_log("guest connected generation=2 agent_connects=2")
        .await;
    match second.next().await {
        Some(HostToGuest::Resize { cols: 80, rows: 24 }) => {}
        other => panic!("expected the remembered size, got {other:?}"),
    }
    cli.send(&ClientToProcess::Input {
        data: b"after-rekey".to_vec(),
    })
    .await;
    assert_eq!(second.read_terminal(11).await, b"after-rekey");
    second.output(b"from-gen-2").await;
    cli.output_until(b"from-gen-2").await;
    assert_eq!(status(&vm).await.generation, 2);
}

#[tokio::test]
async fn round_trip_then_all_output_before_the_exit_status() {
    let mut vm = Vm::start(&[]);
    let token = vm.token();
    let mut guest = FakeGuest::connect(&vm, &token, 1).await;
    assert_eq!(vm.ready_line().await, "ready\n");
    let mut cli = Cli::attach(&vm).await;
    assert_eq!(
        guest.next().await,
        Some(HostToGuest::Resize { cols: 80, rows: 24 })
    );

    let mut other = Cli::connect(&vm).await;
    other
        .send(&ClientToProcess::Attach { cols: 1, rows: 1 })
        .await;
    match other.recv().await {
        Some(ProcessToClient::Error { message }) => {
            assert!(
                message.contains("a client is already attached"),
                "{message}"
            )
        }
        reply => panic!("{reply:?}"),
    }

    cli.send(&ClientToProcess::Input {
        data: b"echo hi\r".to_vec(),
    })
    .await;
    assert_eq!(guest.read_terminal(8).await, b"echo hi\r");
    cli.send(&ClientToProcess::Resize {
        cols: 100,
        rows: 40,
    })
    .await;
    assert_eq!(
        guest.next().await,
        Some(HostToGuest::Resize {
            cols: 100,
            rows: 40
        })
    );

    // 1 MiB of output, then the status at once, and no EOF on the terminal
    // (vhost-device-vsock does not relay a half-close): the Exit frame alone
    // tells the host the output is complete, and the client must get every
    // byte, in order, before the status.
    let pattern: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let pattern = pattern.clone();
        let FakeGuest { term, .. } = &mut guest;
        let (_, mut term_wr) = std::mem::replace(term, UnixStream::pair().unwrap().0).into_split();
        tokio::spawn(async move {
            term_wr.write_all(&output_frames(&pattern)).await.unwrap();
            term_wr.write_all(&exit_frame(Some(3), None)).await.unwrap();
            term_wr
        })
    };
    let mut got = Vec::new();
    let status = loop {
        match cli.recv().await {
            Some(ProcessToClient::Output { data }) => {
                assert!(data.len() <= capsem_proto::ipc::MAX_IPC_CHUNK);
                got.extend(data);
            }
            Some(ProcessToClient::ShellExited { exit_code, signal }) => break (exit_code, signal),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(got.len(), pattern.len());
    assert!(got == pattern, "output corrupted or reordered");
    assert_eq!(status, (Some(3), None));
    assert_eq!(cli.recv().await, None, "nothing after the status");
    drop(writer.await.unwrap());
    // A persistent VM outlives its shell: the exit is recorded, the process
    // waits for the agent's next shell, and a Shutdown ends it.
    vm.wait_log("waiting for the agent's next shell").await;
    let recorded: capsem_host::vmstate::VmStatusFile =
        capsem_host::vmstate::read_json(&vm.dir.join("status.json"))
            .unwrap()
            .unwrap();
    assert_eq!(recorded.last_shell_exit.unwrap().exit_code, Some(3));
    assert!(vm.dir.join("pids.json").exists());
    Cli::connect(&vm)
        .await
        .send(&ClientToProcess::Shutdown)
        .await;
    assert_eq!(vm.wait_exit(), Some(0));
    assert!(!vm.dir.join("pids.json").exists(), "pids.json left behind");
    let log = vm.log();
    assert!(log.contains("shell exited: exit_code=Some(3)"), "{log}");
    assert!(log.contains("teardown complete"), "{log}");
    for sock in ["ctl.sock", "vsock.sock_5000", "vsock.sock_5001"] {
        assert!(!vm.sock(sock).exists(), "{sock} left behind");
    }
    assert!(vm.dir.exists(), "a persistent VM keeps its directory");
    for name in ["agent.pid", "orphan.pid"] {
        assert!(gone(vm.pid_file(name)), "{name} survived teardown");
    }
}

#[tokio::test]
async fn dropped_guest_connections_reconnect_with_the_client_attached() {
    let mut vm = Vm::start(&[]);
    let token = vm.token();
    let mut guest = FakeGuest::connect(&vm, &token, 1).await;
    assert_eq!(vm.ready_line().await, "ready\n");
    let mut cli = Cli::attach(&vm).await;

    let mut hook = Cli::connect(&vm).await;
    hook.send(&ClientToProcess::DropGuestConnections).await;
    while let Some(msg) = guest.next().await {
        assert!(matches!(msg, HostToGuest::Resize { .. }), "{msg:?}");
    }
    guest.terminal_closed().await;
    let end = Instant::now() + DEADLINE;
    loop {
        let s = status(&vm).await;
        if !s.bridged {
            assert!(s.attached, "{s:?}");
            break;
        }
        assert!(Instant::now() < end, "still bridged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut again = FakeGuest::connect(&vm, &token, 2).await;
    vm.wait_log("generation 2 bridged").await;
    cli.send(&ClientToProcess::Input {
        data: b"typed".to_vec(),
    })
    .await;
    assert_eq!(again.read_terminal(5).await, b"typed");
    again.output(b"reconnected").await;
    cli.output_until(b"reconnected").await;
    let s = status(&vm).await;
    assert!(s.bridged && s.attached && s.generation == 2, "{s:?}");
}

#[tokio::test]
async fn temporary_vm_is_destroyed_when_its_client_leaves() {
    let mut vm = Vm::start(&["--temporary"]);
    let token = vm.token();
    let _guest = FakeGuest::connect(&vm, &token, 1).await;
    assert_eq!(vm.ready_line().await, "ready\n");
    let agent = vm.pid_file("agent.pid");
    let orphan = vm.pid_file("orphan.pid");
    assert!(ours(agent, &vm.scratch) && ours(orphan, &vm.scratch));
    let cli = Cli::attach(&vm).await;
    drop(cli);
    assert_eq!(vm.wait_exit(), Some(0));
    assert!(!vm.dir.exists(), "temporary VM dir left behind");
    assert!(gone(agent), "agent {agent} survived");
    assert!(gone(orphan), "detached descendant {orphan} survived");
}

#[tokio::test]
async fn agent_death_is_a_lost_session() {
    let mut vm = Vm::start(&[]);
    let token = vm.token();
    let _guest = FakeGuest::connect(&vm, &token, 1).await;
    assert_eq!(vm.ready_line().await, "ready\n");
    let mut cli = Cli::attach(&vm).await;
    let agent = vm.pid_file("agent.pid");
    assert!(ours(agent, &vm.scratch));
    kill(Pid::from_raw(agent), Signal::SIGKILL).unwrap();
    loop {
        match cli.recv().await {
            Some(ProcessToClient::SessionLost { reason }) => {
                assert!(reason.contains("capsem-agent exited"), "{reason}");
                break;
            }
            Some(ProcessToClient::Output { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(vm.wait_exit(), Some(0));
}

#[tokio::test]
async fn unresponsive_guest_is_reported_and_shutdown_is_orderly() {
    let mut vm = Vm::start(&["--missed-pongs", "2"]);
    let token = vm.token();
    let mut guest = FakeGuest::connect(&vm, &token, 1).await;
    assert_eq!(vm.ready_line().await, "ready\n");
    let mut cli = Cli::attach(&vm).await;
    guest.answer_pings.store(false, Ordering::SeqCst);
    assert_eq!(
        cli.recv().await,
        Some(ProcessToClient::GuestUnresponsive { missed_pongs: 2 })
    );
    vm.wait_log("guest unresponsive").await;
    guest.answer_pings.store(true, Ordering::SeqCst);
    assert_eq!(cli.recv().await, Some(ProcessToClient::GuestResponsive));

    cli.send(&ClientToProcess::Shutdown).await;
    match cli.recv().await {
        Some(ProcessToClient::SessionLost { reason }) => assert!(reason.contains("shut down")),
        other => panic!("unexpected {other:?}"),
    }
    loop {
        match guest.next().await {
            Some(HostToGuest::Shutdown) => break,
            Some(HostToGuest::Resize { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(vm.wait_exit(), Some(0));
    vm.wait_log("teardown complete").await;
}

#[tokio::test]
async fn boot_failures_are_reported_on_the_ready_fd() {
    let mut vm = Vm::start(&["--boot-timeout-ms", "300"]);
    let line = vm.ready_line().await;
    assert!(
        line.starts_with("error: the guest did not connect within 300 ms (logs: "),
        "{line:?}"
    );
    assert!(line.ends_with(")\n"), "{line:?}");
    assert_eq!(vm.wait_exit(), Some(1));

    // No image under this test's home: a clear error naming the fix.
    let mut vm = Vm::start_vmm("qemu", &["--image-dir", "/nonexistent-capsem-image"]);
    let line = vm.ready_line().await;
    assert!(
        line.starts_with("error: no guest image at /nonexistent-capsem-image"),
        "{line:?}"
    );
    assert!(line.contains("images/build.sh"), "{line:?}");
    assert_eq!(vm.wait_exit(), Some(1));

    let status = Command::new(env!("CARGO_BIN_EXE_capsem-process"))
        .args(["--vm-id", "x"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}

#[tokio::test]
async fn detached_output_fills_a_bounded_ring_replayed_on_attach_then_backpressure() {
    let mut vm = Vm::start(&[]);
    let token = vm.token();
    let guest = FakeGuest::connect(&vm, &token, 1).await;
    assert_eq!(vm.ready_line().await, "ready\n");
    let pid = vm.child.as_ref().unwrap().id();
    let total = 32 * 1024 * 1024;
    let stream: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    let (_, mut term_wr) = guest.term.into_split();
    // Nobody attached: a detached shell never blocks, and memory stays flat
    // (the ring keeps only the newest 256 KiB).
    let mut peak = 0;
    for chunk in stream.chunks(1024 * 1024) {
        tokio::time::timeout(DEADLINE, term_wr.write_all(&output_frames(chunk)))
            .await
            .expect("a detached shell blocked")
            .unwrap();
        peak = peak.max(rss_kib(pid));
    }
    term_wr.write_all(&output_frames(b"<END>")).await.unwrap();
    assert!(peak < 24 * 1024, "capsem-process RSS peaked at {peak} KiB");

    // Attaching replays the ring, then live output: together a contiguous
    // suffix of everything written, at least the ring's size, no byte twice.
    let mut cli = Cli::attach(&vm).await;
    let got = cli.output_until(b"<END>").await;
    let mut all = stream.clone();
    all.extend_from_slice(b"<END>");
    assert!(got.len() >= 256 * 1024, "only {} bytes replayed", got.len());
    assert!(got.len() < 2 * 1024 * 1024, "{} bytes replayed", got.len());
    assert!(all.ends_with(&got), "the replay is not the newest output");

    // Attached but not reading: the bytes stay in the guest.
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..total / chunk.len() {
            term_wr.write_all(&output_frames(&chunk)).await.unwrap();
        }
        let _ = done_tx.send(());
        term_wr
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut done_rx)
            .await
            .is_err(),
        "32 MiB were accepted by a client that reads nothing"
    );
    let mut received = 0usize;
    while received < total {
        match cli.recv().await {
            Some(ProcessToClient::Output { data }) => received += data.len(),
            Some(_) => {}
            None => panic!("EOF after {received} bytes"),
        }
        peak = peak.max(rss_kib(pid));
    }
    assert_eq!(received, total);
    drop(writer.await.unwrap());
    assert!(peak < 24 * 1024, "capsem-process RSS peaked at {peak} KiB");
}
