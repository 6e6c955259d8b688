//! What `capsem doctor` checks, in order: `home`, `capsem-process`,
//! `capsem-agent`, `qemu`, `vhost-device-vsock`, `virtiofsd` (only `-v`
//! needs it: always informational), `accelerator`, `guest
//! image` (an image without `rootfs.erofs` is `warn`: it predates the Debian
//! root), `mkfs.ext4` (each VM's writable disk), `mmdebstrap` and
//! `mkfs.erofs` (only images/build.sh needs them: always informational).
//! With `--vmm none`, qemu, vhost-device-vsock, the accelerator, the guest
//! image and mkfs.ext4 are informational (`warn`, never `missing`); with
//! `--vmm qemu`, capsem-agent is (the guest runs the agent from the image).
//! The report's format is in [`crate::health`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use nix::unistd::AccessFlags;

use crate::cli::{AccelChoice, Vmm};
use crate::error::one_line_chain;
use crate::health::{build_fix, shell_quote, Check, Status};
use crate::home::{self, HomeError};
use crate::image;
use crate::probe::{self, Lookup, VERSION_TIMEOUT};
use crate::spawn::{self, SpawnError};
use capsem_host::accel::{self, Accel, KvmFacts};

pub const QEMU_BIN_ENV: &str = "CAPSEM_QEMU_BIN";
pub const QEMU_BIN_NAME: &str = "qemu-system-x86_64";
pub const VHOST_BIN_ENV: &str = "CAPSEM_VHOST_VSOCK_BIN";
pub const VHOST_BIN_NAME: &str = "vhost-device-vsock";
pub const VIRTIOFSD_BIN_ENV: &str = "CAPSEM_VIRTIOFSD_BIN";
pub const VIRTIOFSD_BIN_NAME: &str = "virtiofsd";
pub const AGENT_BIN_ENV: &str = "CAPSEM_AGENT_BIN";
pub const AGENT_BIN_NAME: &str = "capsem-agent";

pub const MKFS_EXT4_ENV: &str = "CAPSEM_MKFS_EXT4_BIN";
/// Where Debian puts mkfs.ext4 and mkfs.erofs, which are not on every
/// user's `PATH` (capsem-process looks there for mkfs.ext4 too).
const SBIN_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];

pub const QEMU_FIX: &str = "sudo apt-get install qemu-system-x86";
pub const VHOST_FIX: &str = "cargo install --locked --version 0.3.0 vhost-device-vsock";
pub const VIRTIOFSD_FIX: &str = "scripts/install-deps.sh";

/// Everything the checks read from the host, gathered once (tests fake it).
#[derive(Debug)]
pub struct Inputs {
    pub vmm: Vmm,
    pub accel: AccelChoice,
    pub home: Result<PathBuf, HomeError>,
    pub image_dir_env: Option<OsString>,
    /// `find_process_bin`'s answer: the binary, or the path it looked at.
    pub process: Result<PathBuf, SpawnError>,
    pub agent_env: Option<OsString>,
    pub qemu: Lookup,
    pub vhost: Lookup,
    /// Serves `-v` shares (capsem-process, one per share).
    pub virtiofsd: Lookup,
    /// Formats each VM's writable disk (capsem-process, first boot).
    pub mkfs_ext4: Lookup,
    /// Build the guest image's root filesystem (images/build.sh only).
    pub mmdebstrap: Lookup,
    pub mkfs_erofs: Lookup,
    pub kvm: KvmFacts,
}

impl Inputs {
    /// This host, as the shell path and capsem-process would see it.
    pub fn from_host(home_flag: Option<&Path>, vmm: Vmm, accel: AccelChoice) -> Self {
        let path = std::env::var_os("PATH");
        let user_home = std::env::var_os("HOME");
        let program = |var, name| {
            probe::find_program(
                var,
                std::env::var_os(var),
                name,
                path.clone(),
                user_home.clone(),
            )
        };
        let with_sbin = std::env::join_paths(
            std::env::split_paths(&path.clone().unwrap_or_default())
                .chain(SBIN_DIRS.iter().map(PathBuf::from)),
        )
        .ok();
        // (Only mkfs.ext4 has an override; the other two are found by name.)
        let tool = |var: &'static str, env: Option<OsString>, name| {
            probe::find_program(var, env, name, with_sbin.clone(), None)
        };
        Self {
            vmm,
            accel,
            home: home::resolve_home(
                home_flag,
                std::env::var_os("CAPSEM_HOME").as_deref(),
                home::user_home().as_deref(),
            ),
            image_dir_env: std::env::var_os(image::IMAGE_DIR_ENV),
            process: spawn::find_process_bin(
                std::env::var_os(spawn::PROCESS_BIN_ENV),
                std::env::current_exe(),
            ),
            agent_env: std::env::var_os(AGENT_BIN_ENV),
            qemu: program(QEMU_BIN_ENV, QEMU_BIN_NAME),
            vhost: program(VHOST_BIN_ENV, VHOST_BIN_NAME),
            virtiofsd: program(VIRTIOFSD_BIN_ENV, VIRTIOFSD_BIN_NAME),
            mkfs_ext4: tool(MKFS_EXT4_ENV, std::env::var_os(MKFS_EXT4_ENV), "mkfs.ext4"),
            mmdebstrap: tool("", None, "mmdebstrap"),
            mkfs_erofs: tool("", None, "mkfs.erofs"),
            kvm: accel::probe(Path::new("/sys/module"), Path::new("/dev/kvm")),
        }
    }
}

/// Runs every check.
pub fn checks(inputs: &Inputs) -> Vec<Check> {
    let vm_optional = inputs.vmm == Vmm::None;
    let (process, process_path) = check_process(&inputs.process);
    vec![
        check_home(&inputs.home),
        process,
        check_agent(inputs.agent_env.clone(), process_path.as_deref()).informational(!vm_optional),
        check_program("qemu", QEMU_BIN_NAME, &inputs.qemu, QEMU_FIX).informational(vm_optional),
        check_program(
            "vhost-device-vsock",
            VHOST_BIN_NAME,
            &inputs.vhost,
            VHOST_FIX,
        )
        .informational(vm_optional),
        check_program(
            "virtiofsd",
            VIRTIOFSD_BIN_NAME,
            &inputs.virtiofsd,
            VIRTIOFSD_FIX,
        )
        .informational(true),
        check_accel(inputs.accel, &inputs.kvm).informational(vm_optional),
        check_image(&inputs.home, inputs.image_dir_env.as_deref()).informational(vm_optional),
        check_tool(
            "mkfs.ext4",
            &inputs.mkfs_ext4,
            "sudo apt-get install e2fsprogs",
        )
        .informational(vm_optional),
        // Only images/build.sh needs these: a built image boots without them.
        check_tool(
            "mmdebstrap",
            &inputs.mmdebstrap,
            "sudo apt-get install mmdebstrap",
        )
        .informational(true),
        check_tool(
            "mkfs.erofs",
            &inputs.mkfs_erofs,
            "sudo apt-get install erofs-utils",
        )
        .informational(true),
    ]
}

fn home_fix(path: &Path) -> String {
    format!(
        "sudo install -d -o \"$(id -un)\" -m 0700 {}",
        shell_quote(&path.display().to_string())
    )
}

fn writable(dir: &Path) -> Result<(), nix::Error> {
    nix::unistd::access(dir, AccessFlags::W_OK | AccessFlags::X_OK)
}

/// The home exists and is writable, or its nearest existing ancestor is
/// (capsem creates it).
pub fn check_home(home: &Result<PathBuf, HomeError>) -> Check {
    const WHAT: &str = "home";
    let path = match home {
        Ok(p) => p,
        Err(e) => {
            return Check::new(Status::Missing, WHAT, one_line_chain(e))
                .fix("export CAPSEM_HOME=\"$HOME/.capsem\"")
        }
    };
    let shown = path.display();
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => match writable(path) {
            Ok(()) => Check::new(Status::Ok, WHAT, format!("{shown} is writable")),
            Err(e) => Check::new(
                Status::Missing,
                WHAT,
                format!("{shown} is not writable: {e}"),
            )
            .fix(home_fix(path)),
        },
        Ok(_) => Check::new(Status::Missing, WHAT, format!("{shown} is not a directory")).fix(
            format!("mv {0} {0}.old", shell_quote(&path.display().to_string())),
        ),
        Err(_) => {
            let parent = path.ancestors().skip(1).find(|a| a.is_dir());
            match parent.map(|p| (p, writable(p))) {
                Some((p, Ok(()))) => Check::new(
                    Status::Ok,
                    WHAT,
                    format!(
                        "{shown} does not exist yet; capsem creates it in {}, which is writable",
                        p.display()
                    ),
                ),
                Some((p, Err(e))) => Check::new(
                    Status::Missing,
                    WHAT,
                    format!(
                        "{shown} does not exist and {} is not writable: {e}",
                        p.display()
                    ),
                )
                .fix(home_fix(path)),
                None => Check::new(Status::Missing, WHAT, format!("{shown} is unreachable"))
                    .fix(home_fix(path)),
            }
        }
    }
}

/// capsem-process, found as `capsem shell` finds it. Also returns the path
/// looked at, beside which capsem-process looks for capsem-agent.
pub fn check_process(found: &Result<PathBuf, SpawnError>) -> (Check, Option<PathBuf>) {
    const WHAT: &str = spawn::PROCESS_BIN_NAME;
    match found {
        Ok(p) if probe::is_executable(p) => (
            Check::new(Status::Ok, WHAT, p.display().to_string()),
            Some(p.clone()),
        ),
        Ok(p) => (
            Check::new(
                Status::Missing,
                WHAT,
                format!(
                    "{} ({}) is not an executable file",
                    p.display(),
                    spawn::PROCESS_BIN_ENV
                ),
            )
            .fix(build_fix(WHAT, p)),
            Some(p.clone()),
        ),
        Err(e @ SpawnError::NotFound { path }) => (
            Check::new(Status::Missing, WHAT, one_line_chain(e)).fix(build_fix(WHAT, path)),
            Some(path.clone()),
        ),
        Err(e) => (Check::new(Status::Missing, WHAT, one_line_chain(e)), None),
    }
}

/// capsem-agent as capsem-process finds it for `--vmm none`:
/// `$CAPSEM_AGENT_BIN`, else `capsem-agent` beside capsem-process's real
/// executable. Under qemu the guest runs the agent from the image.
pub fn check_agent(env: Option<OsString>, process: Option<&Path>) -> Check {
    const WHAT: &str = AGENT_BIN_NAME;
    let (path, via_env) = match env.filter(|v| !v.is_empty()) {
        Some(p) => (PathBuf::from(p), true),
        None => match process {
            // capsem-process uses current_exe(), i.e. symlinks resolved.
            Some(p) => (
                std::fs::canonicalize(p)
                    .unwrap_or_else(|_| p.to_path_buf())
                    .with_file_name(AGENT_BIN_NAME),
                false,
            ),
            None => {
                return Check::new(
                    Status::Missing,
                    WHAT,
                    "not looked for: capsem-process was not found",
                )
            }
        },
    };
    if probe::is_executable(&path) {
        Check::new(Status::Ok, WHAT, path.display().to_string())
    } else {
        let how = if via_env { " (CAPSEM_AGENT_BIN)" } else { "" };
        Check::new(
            Status::Missing,
            WHAT,
            format!(
                "{}{how} is not an executable file (needed by --vmm none)",
                path.display()
            ),
        )
        .fix(build_fix(WHAT, &path))
    }
}

/// A host program: found as capsem-process finds it, and answering
/// `--version`.
pub fn check_program(what: &'static str, name: &str, lookup: &Lookup, fix: &str) -> Check {
    let Some(path) = lookup.path() else {
        return Check::new(
            Status::Missing,
            what,
            format!("{name} is not on PATH or in ~/.cargo/bin"),
        )
        .fix(fix);
    };
    let via = match lookup {
        Lookup::Env { var, .. } => format!(" ({var})"),
        _ => String::new(),
    };
    if !probe::is_executable(path) {
        return Check::new(
            Status::Missing,
            what,
            format!("{}{via} is not an executable file", path.display()),
        )
        .fix(fix);
    }
    match probe::version_line(path, VERSION_TIMEOUT) {
        Ok(version) => Check::new(
            Status::Ok,
            what,
            format!("{}{via} ({version})", path.display()),
        ),
        Err(e) => Check::new(
            Status::Missing,
            what,
            format!("{}{via}: {}", path.display(), one_line_chain(&e)),
        )
        .fix(fix),
    }
}

/// A host program that is only run, never asked for a version (mkfs.ext4
/// has no `--version`): found, and executable.
pub fn check_tool(what: &'static str, lookup: &Lookup, fix: &str) -> Check {
    match lookup.path() {
        Some(path) if probe::is_executable(path) => {
            Check::new(Status::Ok, what, path.display().to_string())
        }
        Some(path) => Check::new(
            Status::Missing,
            what,
            format!("{} is not an executable file", path.display()),
        )
        .fix(fix),
        None => Check::new(
            Status::Missing,
            what,
            format!("{what} is not on PATH, in /usr/sbin or in /sbin"),
        )
        .fix(fix),
    }
}

/// Which accelerator qemu would run with, and why.
pub fn check_accel(choice: AccelChoice, kvm: &KvmFacts) -> Check {
    const WHAT: &str = "accelerator";
    let auto = kvm.auto();
    let why = kvm.reason();
    match (choice, auto) {
        (AccelChoice::Auto, Accel::Kvm) => {
            Check::new(Status::Ok, WHAT, format!("auto picks kvm: {why}"))
        }
        (AccelChoice::Auto, Accel::Tcg) => Check::new(
            Status::Warn,
            WHAT,
            format!("auto picks tcg (works, slower): {why}"),
        ),
        (AccelChoice::Tcg, _) => Check::new(
            Status::Warn,
            WHAT,
            format!(
                "tcg by --accel tcg (works, slower); auto would pick {}: {why}",
                auto.name()
            ),
        ),
        (AccelChoice::Kvm, Accel::Kvm) => {
            Check::new(Status::Ok, WHAT, format!("kvm by --accel kvm: {why}"))
        }
        (AccelChoice::Kvm, Accel::Tcg) => {
            let c = Check::new(
                Status::Missing,
                WHAT,
                format!("--accel kvm, but KVM is not usable: {why}"),
            );
            match kvm.fix() {
                Some(f) => c.fix(f),
                None => c,
            }
        }
    }
}

/// The guest image capsem-process boots: its three files and the kernel
/// release in its manifest.
pub fn check_image(home: &Result<PathBuf, HomeError>, env: Option<&std::ffi::OsStr>) -> Check {
    const WHAT: &str = "guest image";
    let dir = match (env.filter(|e| !e.is_empty()), home) {
        (Some(e), _) => PathBuf::from(e),
        (None, Ok(h)) => image::image_dir(None, h),
        (None, Err(_)) => {
            return Check::new(
                Status::Missing,
                WHAT,
                "no home, so no default image directory",
            )
        }
    };
    let fix = format!(
        "images/build.sh {}",
        shell_quote(&dir.display().to_string())
    );
    let missing = image::missing_files(&dir);
    if !dir.is_dir() {
        return Check::new(
            Status::Missing,
            WHAT,
            format!("{} does not exist", dir.display()),
        )
        .fix(fix);
    }
    if !missing.is_empty() {
        return Check::new(
            Status::Missing,
            WHAT,
            format!("{} lacks {}", dir.display(), missing.join(", ")),
        )
        .fix(fix);
    }
    match image::read_kernel_release(&dir) {
        // Built before the disk root: capsem-process boots its initramfs.
        Ok(release) if !dir.join(image::ROOTFS).is_file() => Check::new(
            Status::Warn,
            WHAT,
            format!(
                "{}: kernel {release}, no {} (an image from before the Debian root: \
                 the guest gets only the initramfs)",
                dir.display(),
                image::ROOTFS
            ),
        )
        .fix(fix),
        Ok(release) => Check::new(
            Status::Ok,
            WHAT,
            format!("{}: kernel {release}, Debian root", dir.display()),
        ),
        // capsem-process needs only the files; the manifest is for people.
        Err(e) => Check::new(
            Status::Warn,
            WHAT,
            format!("{}: {}", dir.display(), one_line_chain(&e)),
        )
        .fix(fix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(modules: Vec<&'static str>, dev: bool) -> KvmFacts {
        KvmFacts {
            modules,
            dev_kvm: if dev { Ok(()) } else { Err("denied".into()) },
            dev_kvm_path: "/dev/kvm".into(),
        }
    }

    #[test]
    fn accel_statuses() {
        let kvm = facts(vec!["kvm_intel"], true);
        let pvm = facts(vec![], true);
        assert_eq!(check_accel(AccelChoice::Auto, &kvm).status, Status::Ok);
        let c = check_accel(AccelChoice::Auto, &pvm);
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.starts_with("auto picks tcg"), "{}", c.detail);
        assert_eq!(c.fix, None);
        assert_eq!(check_accel(AccelChoice::Tcg, &kvm).status, Status::Warn);
        assert_eq!(check_accel(AccelChoice::Kvm, &kvm).status, Status::Ok);
        let c = check_accel(AccelChoice::Kvm, &facts(vec!["kvm_amd"], false));
        assert_eq!(c.status, Status::Missing);
        assert!(c.fix.unwrap().contains("usermod"));
    }

    #[test]
    fn home_checks() {
        let d = tempfile::tempdir().unwrap();
        let c = check_home(&Ok(d.path().to_path_buf()));
        assert_eq!(c.status, Status::Ok, "{c:?}");
        let c = check_home(&Ok(d.path().join("a/b")));
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert!(c.detail.contains("does not exist yet"), "{c:?}");
        let file = d.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let c = check_home(&Ok(file));
        assert_eq!(c.status, Status::Missing);
        assert!(c.fix.is_some());
        let c = check_home(&Err(HomeError::NoHome));
        assert_eq!(c.status, Status::Missing);
        assert!(c.fix.is_some());
    }

    #[test]
    fn image_checks() {
        let d = tempfile::tempdir().unwrap();
        let home = Ok(d.path().to_path_buf());
        let c = check_image(&home, None);
        assert_eq!(c.status, Status::Missing);
        assert!(c.detail.ends_with("images/default does not exist"), "{c:?}");
        assert_eq!(
            c.fix.as_deref(),
            Some(format!("images/build.sh {}/images/default", d.path().display()).as_str())
        );
        let img = d.path().join("img");
        std::fs::create_dir(&img).unwrap();
        std::fs::write(img.join("vmlinuz"), b"k").unwrap();
        let c = check_image(&home, Some(img.as_os_str()));
        assert!(c.detail.ends_with("lacks initramfs.cpio.gz, manifest.json"));
        std::fs::write(img.join("initramfs.cpio.gz"), b"i").unwrap();
        std::fs::write(img.join("manifest.json"), b"{}").unwrap();
        assert_eq!(
            check_image(&home, Some(img.as_os_str())).status,
            Status::Warn
        );
        std::fs::write(
            img.join("manifest.json"),
            br#"{"kernel": {"release": "6.1.0-56-amd64"}}"#,
        )
        .unwrap();
        let c = check_image(&home, Some(img.as_os_str()));
        assert_eq!(c.status, Status::Warn);
        assert!(
            c.detail
                .contains(": kernel 6.1.0-56-amd64, no rootfs.erofs"),
            "{c:?}"
        );
        assert!(c.fix.is_some(), "{c:?}");
        std::fs::write(img.join("rootfs.erofs"), b"r").unwrap();
        let c = check_image(&home, Some(img.as_os_str()));
        assert_eq!(c.status, Status::Ok);
        assert!(
            c.detail.ends_with(": kernel 6.1.0-56-amd64, Debian root"),
            "{c:?}"
        );
    }

    #[test]
    fn tool_checks() {
        let d = tempfile::tempdir().unwrap();
        let c = check_tool(
            "mkfs.ext4",
            &Lookup::NotFound,
            "sudo apt-get install e2fsprogs",
        );
        assert_eq!(c.status, Status::Missing);
        assert_eq!(c.fix.as_deref(), Some("sudo apt-get install e2fsprogs"));
        let plain = d.path().join("plain");
        std::fs::write(&plain, b"").unwrap();
        let c = check_tool("mkfs.ext4", &Lookup::Found(plain), "fix");
        assert_eq!(c.status, Status::Missing, "{c:?}");
        let c = check_tool("mkfs.ext4", &Lookup::Found("/bin/sh".into()), "fix");
        assert_eq!(c.status, Status::Ok, "{c:?}");
        assert_eq!(c.fix, None);
    }

    #[test]
    fn agent_beside_process_or_env() {
        let d = tempfile::tempdir().unwrap();
        let process = d.path().join("capsem-process");
        let c = check_agent(None, Some(&process));
        assert_eq!(c.status, Status::Missing);
        assert!(c.fix.is_some());
        let agent = d.path().join("capsem-agent");
        std::fs::write(&agent, b"").unwrap();
        std::fs::set_permissions(
            &agent,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
        )
        .unwrap();
        assert_eq!(check_agent(None, Some(&process)).status, Status::Ok);
        let c = check_agent(Some("/nope/agent".into()), Some(&process));
        assert_eq!(c.status, Status::Missing);
        assert!(c.detail.contains("CAPSEM_AGENT_BIN"), "{c:?}");
        assert_eq!(check_agent(None, None).status, Status::Missing);
    }
}
