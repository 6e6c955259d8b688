//! `-v HOST_DIR:GUEST_PATH[:MODE]`: parsed and checked before anything
//! boots, into the [`Share`]s that `vm.json` records. The host directory
//! is canonicalized (absolute, symlinks resolved) so the VM shares what
//! the user named even if a symlink on the way changes later.

use std::path::{Path, PathBuf};

use capsem_host::share::{self, Share, ShareError, ShareMode, MAX_HOST_PATH, MAX_SHARES};

use crate::cli::Vmm;

/// Why a `-v` was refused (exit 125).
#[derive(Debug, thiserror::Error)]
pub enum ShareArgError {
    #[error("-v {0:?}: expected HOST_DIR:GUEST_PATH[:MODE] (paths cannot contain ':')")]
    Form(String),
    #[error("-v {spec:?}: unknown mode {mode:?} (rw, ro or overlay)")]
    Mode { spec: String, mode: String },
    #[error("-v {0:?}: the host path must be absolute")]
    HostRelative(String),
    #[error("-v {spec:?}: cannot use host directory {path}")]
    HostMissing {
        spec: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("-v {spec:?}: {path} is not a directory")]
    HostNotDir { spec: String, path: PathBuf },
    #[error("-v {spec:?}: the host path {path} is not UTF-8 or is over {MAX_HOST_PATH} bytes")]
    HostName { spec: String, path: PathBuf },
    #[error("-v {spec:?}")]
    Guest {
        spec: String,
        #[source]
        source: ShareError,
    },
    #[error("-v {spec:?}: guest path {guest:?} overlaps another share's {other:?}")]
    Overlap {
        spec: String,
        guest: String,
        other: String,
    },
    #[error("at most {MAX_SHARES} -v shares per VM")]
    TooMany,
    #[error("-v needs a VM: --vmm none runs on this host and cannot enforce ro or overlay")]
    NeedsVm,
}

/// Parses every `-v` of a new VM; none is `Ok(vec![])` for any backend.
pub fn parse_all(specs: &[String], vmm: Vmm) -> Result<Vec<Share>, ShareArgError> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    if vmm == Vmm::None {
        return Err(ShareArgError::NeedsVm);
    }
    if specs.len() > MAX_SHARES {
        return Err(ShareArgError::TooMany);
    }
    let mut out: Vec<Share> = Vec::new();
    for spec in specs {
        let s = parse_one(spec)?;
        if let Some(other) = out
            .iter()
            .find(|o| share::is_within(&s.guest, &o.guest) || share::is_within(&o.guest, &s.guest))
        {
            return Err(ShareArgError::Overlap {
                spec: spec.clone(),
                guest: s.guest,
                other: other.guest.clone(),
            });
        }
        out.push(s);
    }
    Ok(out)
}

/// One `HOST_DIR:GUEST_PATH[:MODE]`.
pub fn parse_one(spec: &str) -> Result<Share, ShareArgError> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (host, guest, mode) = match parts[..] {
        [h, g] => (h, g, ShareMode::Rw),
        [h, g, m] => (
            h,
            g,
            ShareMode::parse(m).ok_or_else(|| ShareArgError::Mode {
                spec: spec.into(),
                mode: m.into(),
            })?,
        ),
        _ => return Err(ShareArgError::Form(spec.into())),
    };
    if host.is_empty() || guest.is_empty() {
        return Err(ShareArgError::Form(spec.into()));
    }
    if !Path::new(host).is_absolute() {
        return Err(ShareArgError::HostRelative(spec.into()));
    }
    let canonical = std::fs::canonicalize(host).map_err(|source| ShareArgError::HostMissing {
        spec: spec.into(),
        path: host.into(),
        source,
    })?;
    if !canonical.is_dir() {
        return Err(ShareArgError::HostNotDir {
            spec: spec.into(),
            path: canonical,
        });
    }
    if canonical.to_str().is_none() || canonical.as_os_str().len() > MAX_HOST_PATH {
        return Err(ShareArgError::HostName {
            spec: spec.into(),
            path: canonical,
        });
    }
    share::check_guest_path(guest).map_err(|source| ShareArgError::Guest {
        spec: spec.into(),
        source,
    })?;
    Ok(Share {
        host: canonical,
        guest: guest.into(),
        mode,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn modes_and_canonical_host() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let link = dir.path().join("link");
        let l = link.to_str().unwrap();
        let got = parse_all(
            &specs(&[
                &format!("{l}:/a"),
                &format!("{l}:/b:ro"),
                &format!("{l}:/c:overlay"),
                &format!("{l}:/d:rw"),
            ]),
            Vmm::Qemu,
        )
        .unwrap();
        let modes: Vec<ShareMode> = got.iter().map(|s| s.mode).collect();
        assert_eq!(
            modes,
            [
                ShareMode::Rw,
                ShareMode::Ro,
                ShareMode::Overlay,
                ShareMode::Rw
            ]
        );
        assert!(got.iter().all(|s| s.host == real));
        assert_eq!(parse_all(&[], Vmm::None).unwrap(), vec![]);
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap().to_owned();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let f = file.to_str().unwrap();
        let one = |s: &str| parse_all(&specs(&[s]), Vmm::Qemu).unwrap_err();
        assert!(matches!(one("rel:/a"), ShareArgError::HostRelative(_)));
        assert!(matches!(
            one(&format!("{d}/missing:/a")),
            ShareArgError::HostMissing { .. }
        ));
        assert!(matches!(
            one(&format!("{f}:/a")),
            ShareArgError::HostNotDir { .. }
        ));
        assert!(matches!(
            one(&format!("{d}:a")),
            ShareArgError::Guest {
                source: ShareError::GuestRelative(_),
                ..
            }
        ));
        assert!(matches!(
            one(&format!("{d}:/")),
            ShareArgError::Guest {
                source: ShareError::GuestRoot(_),
                ..
            }
        ));
        assert!(matches!(
            one(&format!("{d}:/a:rx")),
            ShareArgError::Mode { .. }
        ));
        assert!(matches!(one(&d), ShareArgError::Form(_)));
        assert!(matches!(
            one(&format!("{d}:/a:ro:x")),
            ShareArgError::Form(_)
        ));
        assert!(matches!(
            parse_all(&specs(&[&format!("{d}:/a"), &format!("{d}:/a")]), Vmm::Qemu),
            Err(ShareArgError::Overlap { .. })
        ));
        assert!(matches!(
            parse_all(
                &specs(&[&format!("{d}:/a"), &format!("{d}:/a/b")]),
                Vmm::Qemu
            ),
            Err(ShareArgError::Overlap { .. })
        ));
        assert!(matches!(
            parse_all(&specs(&[&format!("{d}:/a")]), Vmm::None),
            Err(ShareArgError::NeedsVm)
        ));
        let many: Vec<String> = (0..=MAX_SHARES).map(|i| format!("{d}:/s{i}")).collect();
        assert!(matches!(
            parse_all(&many, Vmm::Qemu),
            Err(ShareArgError::TooMany)
        ));
    }
}
