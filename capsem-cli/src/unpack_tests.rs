//! The host unpacker against crafted, hostile archives: nothing lands
//! outside DST, whatever the names, links and sizes say.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use tar::{EntryType, Header};

use super::*;

/// One raw entry: the name and link bytes written as they are (the
/// crate's setters refuse `..`, which is the point here).
fn raw(name: &[u8], kind: EntryType, link: &[u8], mode: u32, data: &[u8]) -> Vec<u8> {
    let mut h = Header::new_gnu();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(1_000_000);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = entries.concat();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn dir(name: &str) -> Vec<u8> {
    raw(name.as_bytes(), EntryType::Directory, b"", 0o755, b"")
}

fn file(name: &str, data: &[u8]) -> Vec<u8> {
    raw(name.as_bytes(), EntryType::Regular, b"", 0o644, data)
}

/// A host layout: `dst` (an empty directory) beside `outside`, with one
/// file in `outside` that must survive every attack.
struct Layout {
    _tmp: tempfile::TempDir,
    dst: PathBuf,
    outside: PathBuf,
}

fn layout() -> Layout {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dst");
    let outside = tmp.path().join("outside");
    fs::create_dir(&dst).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), b"untouched").unwrap();
    fs::set_permissions(&outside, fs::Permissions::from_mode(0o750)).unwrap();
    Layout {
        _tmp: tmp,
        dst,
        outside,
    }
}

impl Layout {
    fn unpack(&self, bytes: &[u8]) -> Result<Unpacked, UnpackError> {
        unpack(bytes, OsStr::new("top"), &HostDst::Dir(self.dst.clone()))
    }

    /// `outside` is exactly as it was.
    fn outside_untouched(&self) {
        let names: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsStr::new("victim")]);
        assert_eq!(fs::read(self.outside.join("victim")).unwrap(), b"untouched");
        let mode = fs::metadata(&self.outside).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o750);
        let parent = self.dst.parent().unwrap();
        let mut around: Vec<_> = fs::read_dir(parent)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        around.sort();
        assert_eq!(around, vec![OsStr::new("dst"), OsStr::new("outside")]);
    }
}

#[test]
fn a_tree_arrives_with_modes_links_and_times() {
    let l = layout();
    let bytes = archive(&[
        raw(b"top/", EntryType::Directory, b"", 0o750, b""),
        raw(
            b"top/run.sh",
            EntryType::Regular,
            b"",
            0o755,
            b"#!/bin/sh\n",
        ),
        raw(b"top/sub/", EntryType::Directory, b"", 0o700, b""),
        file("top/sub/data", b"hello"),
        raw(b"top/link", EntryType::Symlink, b"sub/data", 0o777, b""),
        raw(b"top/hard", EntryType::Link, b"top/sub/data", 0o644, b""),
    ]);
    let done = l.unpack(&bytes).unwrap();
    assert_eq!(done.entries, 6);
    let top = l.dst.join("top");
    assert_eq!(done.root, fs::canonicalize(&top).unwrap());
    assert_eq!(fs::read(top.join("sub/data")).unwrap(), b"hello");
    assert_eq!(fs::read(top.join("hard")).unwrap(), b"hello");
    assert_eq!(fs::metadata(top.join("hard")).unwrap().nlink(), 2);
    assert_eq!(
        fs::read_link(top.join("link")).unwrap(),
        Path::new("sub/data")
    );
    let mode = |p: &str| fs::symlink_metadata(top.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("run.sh"), 0o755);
    assert_eq!(mode("sub"), 0o700);
    assert_eq!(fs::metadata(&top).unwrap().mode() & 0o7777, 0o750);
    // Directory times are set last, so their own contents do not undo them.
    for p in ["", "sub", "run.sh", "sub/data"] {
        assert_eq!(fs::metadata(top.join(p)).unwrap().mtime(), 1_000_000, "{p}");
    }
    l.outside_untouched();
}

#[test]
fn dot_dot_and_absolute_names_are_refused() {
    for bad in [
        "top/../escape",
        "top/../../escape",
        "/tmp/escape",
        "../escape",
        "other/x",
        "top/sub/../../escape",
    ] {
        let l = layout();
        let bytes = archive(&[dir("top/"), file(bad, b"pwned")]);
        let e = l.unpack(&bytes).unwrap_err();
        assert!(matches!(e, UnpackError::Outside(_)), "{bad}: {e}");
        l.outside_untouched();
    }
}

#[test]
fn writes_through_a_planted_symlink_are_refused() {
    let l = layout();
    let out = l.outside.to_str().unwrap().as_bytes().to_vec();
    // A directory symlink, then a file "inside" it.
    let bytes = archive(&[
        dir("top/"),
        raw(b"top/link", EntryType::Symlink, &out, 0o777, b""),
        file("top/link/victim", b"pwned"),
    ]);
    let e = l.unpack(&bytes).unwrap_err();
    assert!(matches!(e, UnpackError::NotDirInTree(_)), "{e}");
    l.outside_untouched();

    // A symlink, then a directory entry of the same name (whose chmod
    // would follow it).
    let l = layout();
    let out = l.outside.to_str().unwrap().as_bytes().to_vec();
    let bytes = archive(&[
        dir("top/"),
        raw(b"top/link", EntryType::Symlink, &out, 0o777, b""),
        raw(b"top/link/", EntryType::Directory, b"", 0o777, b""),
    ]);
    assert!(l.unpack(&bytes).is_err());
    l.outside_untouched();

    // A symlink to a file, then a file of the same name: the link is
    // replaced, its target is not written.
    let l = layout();
    let victim = l.outside.join("victim");
    let bytes = archive(&[
        dir("top/"),
        raw(
            b"top/f",
            EntryType::Symlink,
            victim.to_str().unwrap().as_bytes(),
            0o777,
            b"",
        ),
        file("top/f", b"replaced"),
    ]);
    l.unpack(&bytes).unwrap();
    assert_eq!(fs::read(l.dst.join("top/f")).unwrap(), b"replaced");
    assert!(!fs::symlink_metadata(l.dst.join("top/f"))
        .unwrap()
        .is_symlink());
    l.outside_untouched();
}

#[test]
fn hard_links_must_point_inside_at_a_file() {
    for target in [
        b"/etc/passwd".as_slice(),
        b"top/../outside/victim",
        b"top",
        b"top/nothing",
    ] {
        let l = layout();
        let bytes = archive(&[
            dir("top/"),
            raw(b"top/h", EntryType::Link, target, 0o644, b""),
        ]);
        let e = l.unpack(&bytes).unwrap_err();
        assert!(matches!(e, UnpackError::Outside(_)), "{e}");
        l.outside_untouched();
    }
}

#[test]
fn devices_fifos_and_setuid_bits_do_not_come_through() {
    let l = layout();
    let bytes = archive(&[
        dir("top/"),
        raw(b"top/null", EntryType::Char, b"", 0o666, b""),
    ]);
    let e = l.unpack(&bytes).unwrap_err();
    assert!(matches!(e, UnpackError::Unsupported { .. }), "{e}");
    let l = layout();
    let bytes = archive(&[
        dir("top/"),
        raw(b"top/fifo", EntryType::Fifo, b"", 0o666, b""),
    ]);
    assert!(l.unpack(&bytes).is_err());

    let l = layout();
    let bytes = archive(&[
        raw(b"top/", EntryType::Directory, b"", 0o2755, b""),
        raw(b"top/suid", EntryType::Regular, b"", 0o4755, b"x"),
    ]);
    l.unpack(&bytes).unwrap();
    let mode = |p: &str| fs::metadata(l.dst.join(p)).unwrap().mode() & 0o7777;
    assert_eq!(mode("top/suid"), 0o755);
    assert_eq!(mode("top"), 0o755);
}

#[test]
fn headers_cannot_make_memory_grow() {
    // A GNU long name as big as the budget allows, plus one byte: refused
    // before it is all read.
    let l = layout();
    let long = vec![b'a'; (META_BUDGET as usize) + 1];
    let bytes = archive(&[
        dir("top/"),
        raw(b"././@LongLink", EntryType::GNULongName, b"", 0o644, &long),
        file("top/x", b"x"),
    ]);
    let e = l.unpack(&bytes).unwrap_err();
    assert!(matches!(e, UnpackError::Stream(_)), "{e}");

    // A header that claims far more data than the stream carries: the
    // stream's end is an error, nothing is sized from the claim.
    let l = layout();
    let mut h = Header::new_gnu();
    h.set_path("top").unwrap();
    h.set_entry_type(EntryType::Regular);
    h.set_size(1 << 40);
    h.set_mode(0o644);
    h.set_cksum();
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend_from_slice(&[7u8; 4096]);
    let e = l.unpack(&bytes[..]).unwrap_err();
    assert!(
        matches!(e, UnpackError::Io { .. } | UnpackError::Stream(_)),
        "{e}"
    );
    assert!(fs::metadata(l.dst.join("top")).unwrap().len() <= 4096);
}

#[test]
fn garbage_and_empty_streams_are_errors() {
    let l = layout();
    assert!(matches!(l.unpack(&[0u8; 1024]), Err(UnpackError::Empty)));
    assert!(matches!(l.unpack(&[]), Err(UnpackError::Empty)));
    let e = l.unpack(&[0x5a; 4096]).unwrap_err();
    assert!(matches!(e, UnpackError::Stream(_)), "{e}");
    // The top entry must come first, and only once.
    let bytes = archive(&[file("top/x", b"x")]);
    assert!(matches!(l.unpack(&bytes), Err(UnpackError::Outside(_))));
    let bytes = archive(&[dir("top/"), dir("top/")]);
    assert!(matches!(l.unpack(&bytes), Err(UnpackError::Outside(_))));
    // A file at the top has nothing below it.
    let l = layout();
    let bytes = archive(&[file("top", b"x"), file("top/y", b"y")]);
    assert!(matches!(l.unpack(&bytes), Err(UnpackError::Outside(_))));
    l.outside_untouched();
}

#[test]
fn destinations_follow_dockers_rules() {
    let tmp = tempfile::tempdir().unwrap();
    let file_tar = archive(&[file("top", b"data")]);
    let dir_tar = archive(&[dir("top/"), file("top/a", b"a")]);
    let name = OsStr::new("top");

    // A missing DST is created under its own name.
    let new = tmp.path().join("new");
    let probe = HostDst::probe(&new).unwrap();
    unpack(&file_tar[..], name, &probe).unwrap();
    assert_eq!(fs::read(&new).unwrap(), b"data");
    // An existing file is replaced by a file...
    let probe = HostDst::probe(&new).unwrap();
    assert_eq!(probe, HostDst::File(new.clone()));
    unpack(&archive(&[file("top", b"v2")])[..], name, &probe).unwrap();
    assert_eq!(fs::read(&new).unwrap(), b"v2");
    // ...never by a directory.
    let e = unpack(&dir_tar[..], name, &probe).unwrap_err();
    assert!(matches!(e, UnpackError::DirToFile(_)), "{e}");
    // A missing directory DST is created with the source's contents.
    let newdir = tmp.path().join("newdir");
    unpack(&dir_tar[..], name, &HostDst::probe(&newdir).unwrap()).unwrap();
    assert_eq!(fs::read(newdir.join("a")).unwrap(), b"a");
    // `DIR/.` into an existing directory: the contents, no new level.
    let dot_tar = archive(&[dir("./"), file("./b", b"b")]);
    unpack(
        &dot_tar[..],
        OsStr::new("."),
        &HostDst::probe(&newdir).unwrap(),
    )
    .unwrap();
    assert_eq!(fs::read(newdir.join("b")).unwrap(), b"b");
    // A file into `missing/`, or under a missing parent.
    let slash = tmp.path().join("nodir/");
    let e = unpack(&file_tar[..], name, &HostDst::probe(&slash).unwrap()).unwrap_err();
    assert!(matches!(e, UnpackError::NotADir(_)), "{e}");
    let e = HostDst::probe(&tmp.path().join("no/such/x")).unwrap_err();
    assert!(matches!(e, UnpackError::NoParent(_)), "{e}");
}
