//! `capsem cp`'s arguments and Docker's rules for them, as pure functions:
//! which side is the VM ([`direction`]), what the guest's `tar -c` is
//! given for a source ([`GuestSource`]), and where a copy into the guest
//! is unpacked ([`guest_target`]). The host side's rules (a copy out of the
//! guest) are applied by [`crate::unpack`], which only learns the source's
//! kind from the stream.

use std::path::PathBuf;

/// Why a `capsem cp` failed. [`CpError::exit`] says how capsem exits.
#[derive(Debug, thiserror::Error)]
pub enum CpError {
    #[error("cp: exactly one of SRC and DST must be NAME:PATH (a VM's path)")]
    Sides,
    #[error("cp: {0:?} has no path after the VM's name")]
    EmptyPath(String),
    #[error("cp: {0}: no such file or directory")]
    NoSource(PathBuf),
    #[error("cp: {path}")]
    HostIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cp: {0}: no such directory")]
    NoParent(String),
    #[error("cp: cannot copy a directory to a file: {0}")]
    DirToFile(String),
    #[error("cp: {0} is not a directory (a tar stream on stdin unpacks into a directory)")]
    StreamNeedsDir(String),
    #[error("cp: {0} is not a directory")]
    NotADir(String),
    /// The guest side's own words (tar's, or the probe's).
    #[error("cp: {0}")]
    Guest(String),
    #[error("cp: the guest's answer {0:?} is not one this command sends")]
    Probe(String),
    #[error(transparent)]
    Unpack(#[from] crate::unpack::UnpackError),
    #[error("cp: writing the tar stream")]
    Pack(#[source] std::io::Error),
}

impl CpError {
    /// 125 for a usage error, 1 (like `docker cp` and `cp`) for a copy that
    /// failed.
    pub fn exit(&self) -> crate::exit::Exit {
        match self {
            CpError::Sides | CpError::EmptyPath(_) => crate::exit::Exit::Failed,
            _ => crate::exit::Exit::CopyFailed,
        }
    }
}

/// One side of `capsem cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `NAME:PATH`.
    Guest { vm: String, path: String },
    /// A host path.
    Host(PathBuf),
    /// `-`: a tar stream on stdin (SRC) or stdout (DST).
    Stream,
}

/// Docker's reading: `-` is the stream; a word starting with `/` or `.`
/// is a host path (write `./a:b` for a host file with a colon); otherwise
/// `NAME:PATH` when the part before the first `:` has no `/`.
pub fn location(arg: &str) -> Location {
    if arg == "-" {
        return Location::Stream;
    }
    if !arg.starts_with('/') && !arg.starts_with('.') {
        if let Some((vm, path)) = arg.split_once(':') {
            if !vm.is_empty() && !vm.contains('/') {
                return Location::Guest {
                    vm: vm.into(),
                    path: path.into(),
                };
            }
        }
    }
    Location::Host(PathBuf::from(arg))
}

/// The host side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSide {
    Path(PathBuf),
    Stream,
}

/// A checked `capsem cp SRC DST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direction {
    /// Host (or stdin) into the VM.
    In {
        src: HostSide,
        vm: String,
        dst: String,
    },
    /// The VM to the host (or stdout).
    Out {
        vm: String,
        src: String,
        dst: HostSide,
    },
}

impl Direction {
    pub fn vm(&self) -> &str {
        match self {
            Direction::In { vm, .. } | Direction::Out { vm, .. } => vm,
        }
    }
}

/// Which way the copy goes; both or neither side `NAME:` is a usage error.
pub fn direction(src: &str, dst: &str) -> Result<Direction, CpError> {
    let host = |l: Location| match l {
        Location::Host(p) => HostSide::Path(p),
        _ => HostSide::Stream,
    };
    let checked = |vm: String, path: String, arg: &str| {
        if path.is_empty() {
            Err(CpError::EmptyPath(arg.into()))
        } else {
            Ok((vm, path))
        }
    };
    match (location(src), location(dst)) {
        (Location::Guest { vm, path }, d @ (Location::Host(_) | Location::Stream)) => {
            let (vm, src_path) = checked(vm, path, src)?;
            Ok(Direction::Out {
                vm,
                src: src_path,
                dst: host(d),
            })
        }
        (s @ (Location::Host(_) | Location::Stream), Location::Guest { vm, path }) => {
            let (vm, dst_path) = checked(vm, path, dst)?;
            Ok(Direction::In {
                src: host(s),
                vm,
                dst: dst_path,
            })
        }
        _ => Err(CpError::Sides),
    }
}

/// A path split Docker's way: `DIR/.` names DIR's contents; otherwise the
/// last component is the name that is copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The directory the name is in (`.` for a bare name).
    pub parent: String,
    /// The last component, with the original trailing `/` (so `tar` refuses
    /// a file named as a directory), or `.` for the contents.
    pub name: String,
    /// `DIR/.` (or `/`): the contents, not the directory itself.
    pub contents: bool,
}

/// Splits a path (a guest's, or a host's as text) into its parent and name.
pub fn split(path: &str) -> Split {
    let contents = |dir: &str| Split {
        parent: if dir.is_empty() {
            "/".into()
        } else {
            dir.into()
        },
        name: ".".into(),
        contents: true,
    };
    if path == "." {
        return contents(".");
    }
    if let Some(dir) = path.strip_suffix("/.") {
        return contents(dir);
    }
    let slash = path.ends_with('/');
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return contents("/");
    }
    let (parent, base) = match trimmed.rsplit_once('/') {
        Some(("", base)) => ("/", base),
        Some((parent, base)) => (parent, base),
        None => (".", trimmed),
    };
    Split {
        parent: parent.into(),
        name: if slash {
            format!("{base}/")
        } else {
            base.into()
        },
        contents: false,
    }
}

/// What the guest's probe found at a copy's destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestDst {
    /// A directory (or a symlink to one).
    Dir,
    /// Something else that exists.
    NonDir,
    /// Nothing, in an existing directory.
    Missing,
    /// Nothing, and its parent is not a directory.
    NoParent,
}

/// The guest's probe: one word on stdout for `$1`.
pub const PROBE_SCRIPT: &str = "if [ -d \"$1\" ]; then echo dir; \
elif [ -e \"$1\" ] || [ -L \"$1\" ]; then echo nondir; \
elif [ -d \"$(dirname -- \"$1\")\" ]; then echo missing; \
else echo noparent; fi";

/// The probe's answer read back.
pub fn parse_probe(out: &[u8]) -> Result<GuestDst, CpError> {
    let text = String::from_utf8_lossy(out);
    match text.trim() {
        "dir" => Ok(GuestDst::Dir),
        "nondir" => Ok(GuestDst::NonDir),
        "missing" => Ok(GuestDst::Missing),
        "noparent" => Ok(GuestDst::NoParent),
        other => Err(CpError::Probe(other.chars().take(80).collect())),
    }
}

/// What the host source is, from its `symlink_metadata` (a symlink is
/// copied as itself, like `docker cp` without `-L`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrcKind {
    Dir,
    NonDir,
}

/// Where a copy into the guest unpacks: `tar -x -C dir`, with the source
/// archived under `name` (`.` for a directory's contents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestTarget {
    pub dir: String,
    pub name: String,
}

/// Docker's rules for DST in the guest: an existing directory receives the
/// source under its own name (or its contents for `SRC/.`); an existing
/// file is replaced by a file; a missing path is created from the source
/// when its parent exists.
pub fn guest_target(
    src: &Split,
    kind: SrcKind,
    dst: &str,
    found: GuestDst,
) -> Result<GuestTarget, CpError> {
    let d = split(dst);
    let src_name = src.name.trim_end_matches('/').to_owned();
    match found {
        GuestDst::Dir => Ok(GuestTarget {
            dir: dst.into(),
            name: if src.contents { ".".into() } else { src_name },
        }),
        GuestDst::NonDir if kind == SrcKind::Dir => Err(CpError::DirToFile(dst.into())),
        GuestDst::NonDir if d.name.ends_with('/') || d.contents => {
            Err(CpError::NotADir(dst.into()))
        }
        GuestDst::Missing if kind == SrcKind::NonDir && (d.name.ends_with('/') || d.contents) => {
            Err(CpError::NoParent(dst.into()))
        }
        GuestDst::NonDir | GuestDst::Missing => Ok(GuestTarget {
            dir: d.parent,
            name: d.name.trim_end_matches('/').into(),
        }),
        GuestDst::NoParent => Err(CpError::NoParent(d.parent)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(vm: &str, path: &str) -> Location {
        Location::Guest {
            vm: vm.into(),
            path: path.into(),
        }
    }

    #[test]
    fn locations_read_dockers_way() {
        assert_eq!(location("-"), Location::Stream);
        assert_eq!(location("box:/etc"), guest("box", "/etc"));
        assert_eq!(location("box:rel/x"), guest("box", "rel/x"));
        assert_eq!(location("box:"), guest("box", ""));
        assert_eq!(location("./a:b"), Location::Host("./a:b".into()));
        assert_eq!(location("/a:b"), Location::Host("/a:b".into()));
        assert_eq!(location("dir/a:b"), Location::Host("dir/a:b".into()));
        assert_eq!(location(":x"), Location::Host(":x".into()));
        assert_eq!(location("plain"), Location::Host("plain".into()));
    }

    #[test]
    fn exactly_one_side_is_a_vm() {
        for (s, d) in [("a:/x", "b:/y"), ("./x", "./y"), ("-", "-"), ("-", "./y")] {
            let e = direction(s, d).unwrap_err();
            assert!(matches!(e, CpError::Sides), "{s} {d}: {e}");
            assert_eq!(e.exit().code(), 125);
        }
        assert!(matches!(
            direction("box:", "./y"),
            Err(CpError::EmptyPath(_))
        ));
        assert_eq!(
            direction("box:/x", "-").unwrap(),
            Direction::Out {
                vm: "box".into(),
                src: "/x".into(),
                dst: HostSide::Stream
            }
        );
        assert_eq!(
            direction("./in", "box:/tmp").unwrap(),
            Direction::In {
                src: HostSide::Path("./in".into()),
                vm: "box".into(),
                dst: "/tmp".into()
            }
        );
    }

    #[test]
    fn paths_split_into_parent_and_name() {
        let s = |p: &str| {
            let s = split(p);
            (s.parent, s.name, s.contents)
        };
        let own = |a: &str, b: &str, c| (a.to_owned(), b.to_owned(), c);
        assert_eq!(s("/a/b"), own("/a", "b", false));
        assert_eq!(s("/a/b/"), own("/a", "b/", false));
        assert_eq!(s("/a"), own("/", "a", false));
        assert_eq!(s("b"), own(".", "b", false));
        assert_eq!(s("/a/b/."), own("/a/b", ".", true));
        assert_eq!(s("/."), own("/", ".", true));
        assert_eq!(s("/"), own("/", ".", true));
        assert_eq!(s("."), own(".", ".", true));
    }

    #[test]
    fn probe_answers_parse() {
        assert_eq!(parse_probe(b"dir\n").unwrap(), GuestDst::Dir);
        assert_eq!(parse_probe(b"missing\n").unwrap(), GuestDst::Missing);
        assert!(matches!(parse_probe(b"what"), Err(CpError::Probe(_))));
    }

    #[test]
    fn guest_destinations_follow_dockers_rules() {
        let t = |src: &str, kind, dst: &str, found| {
            guest_target(&split(src), kind, dst, found).map(|t| (t.dir, t.name))
        };
        let ok = |a: &str, b: &str| Ok::<_, ()>((a.to_owned(), b.to_owned()));
        use GuestDst as G;
        use SrcKind as S;
        // An existing directory: into it, under the source's name.
        assert_eq!(
            t("/h/f", S::NonDir, "/tmp", G::Dir).map_err(|_| ()),
            ok("/tmp", "f")
        );
        assert_eq!(
            t("/h/d/", S::Dir, "/tmp", G::Dir).map_err(|_| ()),
            ok("/tmp", "d")
        );
        // SRC/.: the contents.
        assert_eq!(
            t("/h/d/.", S::Dir, "/tmp", G::Dir).map_err(|_| ()),
            ok("/tmp", ".")
        );
        // Missing: created under DST's name.
        assert_eq!(
            t("/h/d", S::Dir, "/tmp/new", G::Missing).map_err(|_| ()),
            ok("/tmp", "new")
        );
        assert_eq!(
            t("/h/d/.", S::Dir, "/tmp/new/", G::Missing).map_err(|_| ()),
            ok("/tmp", "new")
        );
        assert_eq!(
            t("/h/f", S::NonDir, "/tmp/g", G::Missing).map_err(|_| ()),
            ok("/tmp", "g")
        );
        // An existing file is replaced by a file, never by a directory.
        assert_eq!(
            t("/h/f", S::NonDir, "/tmp/g", G::NonDir).map_err(|_| ()),
            ok("/tmp", "g")
        );
        assert!(matches!(
            t("/h/d", S::Dir, "/tmp/g", G::NonDir),
            Err(CpError::DirToFile(_))
        ));
        // A file into a missing "directory", or a missing parent.
        assert!(matches!(
            t("/h/f", S::NonDir, "/tmp/n/", G::Missing),
            Err(CpError::NoParent(_))
        ));
        assert!(matches!(
            t("/h/f", S::NonDir, "/tmp/g/", G::NonDir),
            Err(CpError::NotADir(_))
        ));
        assert!(matches!(
            t("/h/f", S::NonDir, "/no/x", G::NoParent),
            Err(CpError::NoParent(_))
        ));
        let e = t("/h/f", S::NonDir, "/no/x", G::NoParent).unwrap_err();
        assert_eq!(e.exit().code(), 1);
        assert!(e.to_string().contains("/no"), "{e}");
    }
}
