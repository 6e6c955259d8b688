//! The guest's execve audit stream in a real VM (the kernel audit subsystem
//! runs only in the guest): records reach `capsem audit`, in order, and
//! survive 100 forced reconnects with none lost or duplicated.
//! `CAPSEM_SKIP_VM_TESTS=1 scripts/test.sh` leaves them out (a nextest filter
//! on the `*_qemu` binaries), and nextest counts them as skipped.
#![allow(clippy::unwrap_used)]

use capsem_proto::ipc::ClientToProcess;
use capsem_tests::fixture::{send, wait_until};
use capsem_tests::persist::{exec, ok, vm_dir};
use capsem_tests::scenarios::step;
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::Qemu;

/// Every record `capsem audit NAME --json` prints.
fn records(fx: &Fixture, name: &str) -> Vec<serde_json::Value> {
    ok(fx, &["audit", name, "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The argv of every record whose argv[0] is `prog`, in order.
fn argvs(records: &[serde_json::Value], prog: &str) -> Vec<Vec<String>> {
    records
        .iter()
        .filter(|r| r["argv"][0] == prog)
        .map(|r| {
            r["argv"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_owned())
                .collect()
        })
        .collect()
}

#[test]
fn five_execs_give_five_records_in_order_and_reconnects_lose_none() {
    let fx = Fixture::new("audit_vm", B);
    ok(&fx, &["create", "dev"]);
    let out = exec(
        &fx,
        "dev",
        &[
            "--",
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do /bin/true audit-$i; done",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(0));
    let want: Vec<Vec<String>> = (1..=5)
        .map(|i| vec!["/bin/true".to_owned(), format!("audit-{i}")])
        .collect();
    wait_until(step(B), "the five records", || {
        argvs(&records(&fx, "dev"), "/bin/true").len() >= 5
    });
    let recs = records(&fx, "dev");
    assert_eq!(argvs(&recs, "/bin/true"), want);
    let five: Vec<&serde_json::Value> = recs
        .iter()
        .filter(|r| r["argv"][0] == "/bin/true")
        .collect();
    for r in &five {
        assert!(!r["exe"].as_str().unwrap().is_empty());
        assert!(r["pid"].as_u64().unwrap() > 1);
        assert_eq!(r["uid"], 0);
        assert_eq!(r["success"], true);
        assert!(r["audit_id"].as_str().unwrap().contains(':'));
    }

    // 100 forced reconnects, with execs between them.
    let dir = vm_dir(&fx, "dev");
    let status =
        |dir: &std::path::Path| match capsem_tests::fixture::request(dir, &ClientToProcess::Status)
            .unwrap()
        {
            capsem_proto::ipc::ProcessToClient::Status(s) => s,
            other => panic!("{other:?}"),
        };
    let first = status(&dir).generation;
    for k in 0..100u64 {
        send(&dir, &ClientToProcess::DropGuestConnections).unwrap();
        wait_until(step(B), "the agent to reconnect", || {
            let s = status(&dir);
            s.generation == first + k + 1 && s.bridged
        });
        if k % 10 == 9 {
            let out = exec(&fx, "dev", &["--", "/bin/true", &format!("mark-{k}")], b"");
            assert_eq!(out.status.code(), Some(0));
        }
    }
    let marks: Vec<Vec<String>> = (0..100)
        .filter(|k| k % 10 == 9)
        .map(|k| vec!["/bin/true".to_owned(), format!("mark-{k}")])
        .collect();
    wait_until(step(B), "the marked records", || {
        argvs(&records(&fx, "dev"), "/bin/true").len() >= 5 + marks.len()
    });
    // Let anything late arrive before counting: one more exec, then its record.
    let out = exec(&fx, "dev", &["--", "/bin/true", "last"], b"");
    assert_eq!(out.status.code(), Some(0));
    wait_until(step(B), "the last record", || {
        argvs(&records(&fx, "dev"), "/bin/true")
            .iter()
            .any(|a| a[1] == "last")
    });
    let recs = records(&fx, "dev");
    let mut all = want.clone();
    all.extend(marks);
    all.push(vec!["/bin/true".into(), "last".into()]);
    assert_eq!(
        argvs(&recs, "/bin/true"),
        all,
        "a record was lost or duplicated"
    );
    let serials: Vec<u64> = recs.iter().map(|r| r["serial"].as_u64().unwrap()).collect();
    assert!(
        serials.windows(2).all(|w| w[0] < w[1]),
        "serials not strictly increasing: {serials:?}"
    );

    // Exactly one audit stream is active: every accepted one but the last
    // was replaced or ended.
    let log = std::fs::read_to_string(dir.join("process.log")).unwrap();
    let accepted: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split("audit connection accepted: generation ").nth(1))
        .map(|g| g.trim().parse().unwrap())
        .collect();
    // A generation dropped before its audit hello never gets a stream; the
    // current one has one (the last record came through it).
    let (last, earlier) = accepted.split_last().unwrap();
    assert_eq!(*last, status(&dir).generation, "{accepted:?}");
    for g in earlier {
        let gone = log.contains(&format!("audit connection of generation {g} ended"))
            || log.contains(&format!("audit connection of generation {g} replaced"));
        assert!(gone, "audit connection of generation {g} never ended");
    }
    assert!(!log.contains(&format!("audit connection of generation {last} ended")));
    ok(&fx, &["rm", "--force", "dev"]);
    fx.assert_nothing_left();
}

#[test]
fn run_audit_log_keeps_a_temporary_vms_records() {
    let fx = Fixture::new("audit_run", B);
    let file = fx.home().join("kept.jsonl");
    let out = fx
        .capsem()
        .args(["run", "--audit-log"])
        .arg(&file)
        .args(["--", "sh", "-c", "/bin/true kept-1; /bin/true kept-2"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want: Vec<Vec<String>> = (1..=2)
        .map(|i| vec!["/bin/true".to_owned(), format!("kept-{i}")])
        .collect();
    assert_eq!(argvs(&recs, "/bin/true"), want);
    std::fs::remove_file(&file).unwrap();
    fx.assert_nothing_left();
}
