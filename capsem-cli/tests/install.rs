//! `scripts/install.sh PREFIX` puts a working capsem on the PATH: installed
//! into a temporary PREFIX (from the debug build beside this test's
//! `capsem`, `CAPSEM_INSTALL_FROM`, so the test does not rebuild), run from
//! another directory with a temporary home, it finds capsem-process and
//! the agent beside itself. A second install changes nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn install(prefix: &Path, cwd: &Path) -> Output {
    let from = Path::new(env!("CARGO_BIN_EXE_capsem"))
        .parent()
        .expect("bin dir")
        .to_path_buf();
    for bin in ["capsem-process", "capsem-agent"] {
        assert!(
            from.join(bin).exists(),
            "{} is missing: build the workspace first (cargo build --workspace)",
            from.join(bin).display()
        );
    }
    Command::new(repo().join("scripts/install.sh"))
        .arg(prefix)
        .current_dir(cwd)
        .env("CAPSEM_INSTALL_FROM", &from)
        .output()
        .expect("run install.sh")
}

/// Processes whose executable is under `dir`.
fn running_from(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(exe) = std::fs::read_link(entry.path().join("exe")) {
            if exe.starts_with(dir) {
                found.push(format!(
                    "{} {}",
                    entry.file_name().to_string_lossy(),
                    exe.display()
                ));
            }
        }
    }
    found
}

#[test]
fn installed_capsem_runs_from_anywhere_and_a_second_install_changes_nothing() {
    let root = tempfile::Builder::new()
        .prefix("capsem-i")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let prefix = root.path().join("prefix");
    let elsewhere = root.path().join("elsewhere");
    let home = root.path().join("home");
    std::fs::create_dir(&elsewhere).expect("cwd");

    let files = [
        "bin/capsem",
        "bin/capsem-process",
        "bin/capsem-agent",
        "share/man/man1/capsem.1",
        "share/bash-completion/completions/capsem",
    ];
    let lines = |verb: &str| -> String {
        files
            .iter()
            .map(|f| format!("{verb} {}\n", prefix.join(f).display()))
            .collect()
    };
    let first = install(&prefix, &elsewhere);
    assert_eq!(
        first.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&first.stdout), lines("installed"));
    let again = install(&prefix, &elsewhere);
    assert_eq!(again.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&again.stdout), lines("unchanged"));
    let man = std::fs::read_to_string(prefix.join("share/man/man1/capsem.1")).expect("man");
    assert!(man.contains(".TH capsem 1"));

    let out = Command::new(prefix.join("bin/capsem"))
        .args(["--vmm", "none", "run", "--", "echo", "hi"])
        .current_dir(&elsewhere)
        .env("CAPSEM_HOME", &home)
        .env("PATH", "/usr/bin:/bin")
        .env_remove("CAPSEM_PROCESS_BIN")
        .env_remove("CAPSEM_AGENT_BIN")
        .env_remove("CAPSEM_VMM")
        .env_remove("CAPSEM_IMAGE_DIR")
        .output()
        .expect("run the installed capsem");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n", "{stderr}");
    assert_eq!(
        std::fs::read_dir(home.join("vms")).expect("vms").count(),
        0,
        "the temporary VM was not removed"
    );
    assert_eq!(running_from(&prefix), Vec::<String>::new());
}
