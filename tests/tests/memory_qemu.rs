//! Host memory of an idle VM under QEMU: the page cache a finished workload
//! left in the guest goes back to the host once the guest is idle
//! (capsem-init's `reclaim`, then free page reporting).
//! `CAPSEM_SKIP_VM_TESTS=1 scripts/test.sh` leaves it out.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use capsem_tests::fixture::wait_until;
use capsem_tests::persist::{self, ok};
use capsem_tests::procs::status_kib;
use capsem_tests::{Backend, Fixture};

const B: Backend = Backend::Qemu;
/// 30 s of idle guest, a 10 s sampling tick, and TCG on a shared machine.
const RECLAIM_WAIT: Duration = Duration::from_secs(180);

#[test]
fn an_idle_vm_hands_back_the_page_cache_a_workload_left() {
    let fx = Fixture::new("idle_reclaim", B);
    ok(&fx, &["create", "m"]);
    let qemu = persist::guest_pid(&fx, "m", "qemu");

    // A workload that reads about 150 MiB of the image's files, then ends.
    let read = "cat /usr/bin/* /usr/lib/x86_64-linux-gnu/*.so* >/dev/null 2>&1; \
                awk '/^(Active|Inactive)\\(file\\):/ {s += $2} END {print s}' /proc/meminfo";
    let out = persist::exec(&fx, "m", &["--", "sh", "-c", read], b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let cached_kib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(
        cached_kib >= 96 * 1024,
        "the workload cached only {cached_kib} KiB"
    );
    // QEMU's resident guest RAM (the shared memfd).
    let guest_ram_kib = |pid: i32| status_kib(pid, "RssShmem").expect("QEMU's RssShmem");
    let after_work = guest_ram_kib(qemu);

    // The guest's page cache is not freed while memory is plentiful; only
    // the idle reclaim hands it back.
    wait_until(
        RECLAIM_WAIT,
        "the page cache handed back to the host",
        || guest_ram_kib(qemu) + 64 * 1024 <= after_work,
    );
    let serial = std::fs::read(persist::vm_dir(&fx, "m").join("serial.log")).unwrap();
    assert!(
        String::from_utf8_lossy(&serial).contains("idle: dropped the page cache"),
        "no reclaim line in the console log"
    );

    // Files read again come back from the disk.
    let out = persist::exec(
        &fx,
        "m",
        &["--", "sh", "-c", "cat /usr/bin/* 2>/dev/null | wc -c"],
        b"",
    );
    let bytes: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(bytes >= 32 << 20, "read back {bytes} bytes");
    ok(&fx, &["rm", "--force", "m"]);
    fx.assert_nothing_left();
}
