//! `capsem cp SRC DST`: files and directories into and out of a running
//! persistent VM, with `docker cp`'s rules ([`crate::cpplan`]).
//!
//! The transport is the exec channel ([`crate::transfer`]) running GNU tar
//! in the guest. Into the guest: a probe (`sh -c`, one word) says what DST
//! is, then the host's tar stream (built by the `tar` crate on a thread)
//! feeds `tar -x -C DIR`. Out of the guest: `tar -c -C PARENT -- NAME`'s
//! stdout is unpacked on the host by [`crate::unpack`], which treats it as
//! hostile, or passed through as it is for `-`. Errors from the guest come
//! back as tar's own first line; a failed copy exits 1, a usage error 125.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::context::Ctx;
use crate::cpplan::{self, CpError, Direction, GuestDst, HostSide, SrcKind};
use crate::error::CliError;
use crate::exit::Exit;
use crate::signals::Signals;
use crate::transfer::{self, Finished, Kept, Packer};
use crate::unpack::{self, HostDst};
use crate::vmctl;

/// Copies and returns how capsem exits.
pub fn run(ctx: &Ctx, src: &str, dst: &str) -> Result<Exit, CliError> {
    let direction = cpplan::direction(src, dst)?;
    let vm = vmctl::ensure_running(ctx, direction.vm(), false)?;
    let ctl = vm.ctl_sock();
    let mut signals = Signals::install()?;
    match direction {
        Direction::In { src, dst, .. } => copy_in(&ctl, &mut signals, src, &dst),
        Direction::Out { vm, src, dst } => {
            copy_out(&ctl, &mut signals, &src, dst).map_err(|e| in_vm_terms(e, &vm, &src))
        }
    }
}

/// tar's `NAME: Cannot stat: ...` said as `VM:PATH: Cannot stat: ...`,
/// the way the user wrote the source.
fn in_vm_terms(e: CliError, vm: &str, src: &str) -> CliError {
    let name = cpplan::split(src).name;
    match e {
        CliError::Cp(CpError::Guest(line)) => match line.strip_prefix(&format!("{name}: ")) {
            Some(rest) => CpError::Guest(format!("{vm}:{src}: {rest}")).into(),
            None => CpError::Guest(line).into(),
        },
        other => other,
    }
}

/// A guest command's end as the copy's result: 0 goes on; a signal capsem
/// got is its exit code; any other failure is the guest's first line.
fn guest_result(done: Finished) -> Result<Option<Exit>, CliError> {
    match done.exit {
        Exit::OK => Ok(None),
        Exit::Signal(_) if done.stderr.line().is_none() => Ok(Some(done.exit)),
        other => {
            let line = done
                .stderr
                .line()
                .unwrap_or_else(|| format!("the guest's tar exited with status {}", other.code()));
            Err(CpError::Guest(line).into())
        }
    }
}

/// What DST is in the guest.
fn probe(ctl: &Path, signals: &mut Signals, dst: &str) -> Result<Result<GuestDst, Exit>, CliError> {
    let argv = vec![
        "sh".into(),
        "-c".into(),
        cpplan::PROBE_SCRIPT.into(),
        "sh".into(),
        dst.into(),
    ];
    let null = transfer::null()?;
    let mut out = Kept::default();
    let done = transfer::guest_command(ctl, signals, argv, null.as_fd(), &mut out)?;
    if let Some(exit) = guest_result(done)? {
        return Ok(Err(exit));
    }
    Ok(Ok(cpplan::parse_probe(&out.0)?))
}

/// `tar -x` in the guest, into `dir`.
fn untar_argv(dir: &str) -> Vec<String> {
    ["tar", "-x", "-p", "--no-same-owner", "-f", "-", "-C", dir]
        .map(String::from)
        .to_vec()
}

fn copy_in(ctl: &Path, signals: &mut Signals, src: HostSide, dst: &str) -> Result<Exit, CliError> {
    let mut sink = Kept::default();
    let src = match src {
        HostSide::Stream => {
            let found = match probe(ctl, signals, dst)? {
                Ok(found) => found,
                Err(exit) => return Ok(exit),
            };
            if found != GuestDst::Dir {
                return Err(CpError::StreamNeedsDir(dst.into()).into());
            }
            let stdin = io::stdin();
            let done =
                transfer::guest_command(ctl, signals, untar_argv(dst), stdin.as_fd(), &mut sink)?;
            return Ok(guest_result(done)?.unwrap_or(Exit::OK));
        }
        HostSide::Path(src) => src,
    };
    let text = src.to_string_lossy();
    let split = cpplan::split(&text);
    let kind = match fs::symlink_metadata(&src) {
        Ok(m) if m.is_dir() => SrcKind::Dir,
        Ok(_) => SrcKind::NonDir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(CpError::NoSource(src).into()),
        Err(source) => return Err(CpError::HostIo { path: src, source }.into()),
    };
    if kind == SrcKind::NonDir && (split.contents || split.name.ends_with('/')) {
        return Err(CpError::NotADir(text.into_owned()).into());
    }
    let found = match probe(ctl, signals, dst)? {
        Ok(found) => found,
        Err(exit) => return Ok(exit),
    };
    let target = cpplan::guest_target(&split, kind, dst, found)?;
    let packer = Packer::start(src.clone(), kind, target.name)?;
    let done = {
        let Some(reader) = packer.reader() else {
            return Err(CpError::Pack(io::Error::other("no stream")).into());
        };
        transfer::guest_command(
            ctl,
            signals,
            untar_argv(&target.dir),
            reader.as_fd(),
            &mut sink,
        )?
    };
    let packed = packer.finish();
    if let Some(exit) = guest_result(done)? {
        return Ok(exit);
    }
    packed.map_err(|source| CpError::HostIo { path: src, source })?;
    Ok(Exit::OK)
}

fn copy_out(ctl: &Path, signals: &mut Signals, src: &str, dst: HostSide) -> Result<Exit, CliError> {
    let split = cpplan::split(src);
    let argv: Vec<String> = [
        "tar",
        "-c",
        "-f",
        "-",
        "-C",
        &split.parent,
        "--",
        &split.name,
    ]
    .map(String::from)
    .to_vec();
    let null = transfer::null()?;
    let dst = match dst {
        HostSide::Stream => {
            let mut stdout = io::stdout().lock();
            let done = transfer::guest_command(ctl, signals, argv, null.as_fd(), &mut stdout)?;
            let _ = stdout.flush();
            return Ok(guest_result(done)?.unwrap_or(Exit::OK));
        }
        HostSide::Path(dst) => dst,
    };
    let host = HostDst::probe(&dst).map_err(CpError::from)?;
    let name: PathBuf = split.name.trim_end_matches('/').into();
    let (reader, mut writer) = io::pipe().map_err(CpError::Pack)?;
    let unpacker = std::thread::Builder::new()
        .name("cp-unpack".into())
        .spawn(move || unpack::unpack(reader, OsStr::new(&name), &host))
        .map_err(CpError::Pack)?;
    let done = transfer::guest_command(ctl, signals, argv, null.as_fd(), &mut writer);
    drop(writer);
    let unpacked = unpacker
        .join()
        .map_err(|_| CpError::Pack(io::Error::other("the unpacker panicked")))?;
    if let Some(exit) = guest_result(done?)? {
        return Ok(exit);
    }
    unpacked.map_err(CpError::from)?;
    Ok(Exit::OK)
}
