//! Applying image layers, in order, to one directory tree ([`Flattener`]):
//! gzip, zstd or plain tar; `.wh.NAME` whiteouts delete NAME from the
//! layers below, a `.wh..wh..opq` marker empties its directory of what the
//! layers below put there. Every path goes through [`crate::safepath`], so
//! no entry (name, parent symlink or hard-link target) writes outside the
//! tree, and an existing symlink is replaced, never written through.
//!
//! Kept: regular files, directories, symlinks, hard links, FIFOs, modes
//! (setuid included), mtimes, and, when running as root, owners.
//! Not kept: device nodes (skipped and counted in [`Notes`]), extended
//! attributes (file capabilities included), and, as non-root, owners
//! (every file is the extracting user's) and a directory's missing owner
//! `rwx` bits (added, so the tree can be filled and removed).

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::safepath::{self, Missing, PathError};

/// A whiteout's name prefix.
pub const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// The opaque-directory marker.
pub const OPAQUE: &str = ".wh..wh..opq";

/// How a layer's tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From a file's first bytes (for archives that do not say).
    pub fn sniff(head: &[u8]) -> Self {
        match head {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            _ => Compression::None,
        }
    }
}

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot read the layer")]
    Read(#[source] io::Error),
    #[error("the layer is not valid zstd")]
    Zstd(#[source] ruzstd::decoding::errors::FrameDecoderError),
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("hard link {path} points at {target}, which is missing or a directory")]
    BadHardLink { path: PathBuf, target: PathBuf },
}

/// What was left out while flattening.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Notes {
    /// Character and block devices skipped.
    pub devices_skipped: u64,
    /// Entries of a kind this does not handle (GNU sparse files...).
    pub other_skipped: u64,
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

/// Applies layers one after the other to `root`, then [`Flattener::finish`]
/// sets the directories' modes (deferred, so a read-only directory does not
/// stop a later layer).
#[derive(Debug)]
pub struct Flattener {
    root: PathBuf,
    as_root: bool,
    dirs: BTreeMap<PathBuf, Meta>,
    notes: Notes,
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::Write {
        path: path.to_owned(),
        source,
    }
}

/// Removes whatever is at `path` (a directory with its contents), never
/// following a symlink; nothing there is fine.
fn remove_existing(path: &Path) -> Result<(), LayerError> {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(write_err(path)(e)),
        _ => Ok(()),
    }
}

/// An opaque marker: removes from `dir` everything this layer did not
/// write (recursing into directories this layer wrote, whose other
/// contents came from below).
fn clear_lower(dir: &Path, this_layer: &HashSet<PathBuf>) -> Result<(), LayerError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(write_err(dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(write_err(dir))?.path();
        if !this_layer.contains(&path) {
            remove_existing(&path)?;
        } else if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            clear_lower(&path, this_layer)?;
        }
    }
    Ok(())
}

fn set_mtime(path: &Path, mtime: u64) -> Result<(), LayerError> {
    let t = TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0);
    utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink)
        .map_err(|e| write_err(path)(io::Error::from(e)))
}

impl Flattener {
    /// A flattener writing into the existing directory `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            as_root: nix::unistd::geteuid().is_root(),
            dirs: BTreeMap::new(),
            notes: Notes::default(),
        }
    }

    /// Applies one layer on top of what is there.
    pub fn apply(&mut self, layer: impl Read, compression: Compression) -> Result<(), LayerError> {
        let reader: Box<dyn Read> = match compression {
            Compression::None => Box::new(layer),
            Compression::Gzip => Box::new(flate2::read::GzDecoder::new(layer)),
            Compression::Zstd => {
                Box::new(ruzstd::decoding::StreamingDecoder::new(layer).map_err(LayerError::Zstd)?)
            }
        };
        let mut archive = tar::Archive::new(reader);
        let mut this_layer: HashSet<PathBuf> = HashSet::new();
        for entry in archive.entries().map_err(LayerError::Read)? {
            let mut entry = entry.map_err(LayerError::Read)?;
            let path = entry.path().map_err(LayerError::Read)?.into_owned();
            self.entry(&mut entry, &path, &mut this_layer)?;
        }
        Ok(())
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
        this_layer: &mut HashSet<PathBuf>,
    ) -> Result<(), LayerError> {
        let header = entry.header();
        let meta = Meta {
            mode: header.mode().map_err(LayerError::Read)? & 0o7777,
            // Some writers leave these blank: root, and the epoch.
            uid: header.uid().unwrap_or(0),
            gid: header.gid().unwrap_or(0),
            mtime: header.mtime().unwrap_or(0),
        };
        let kind = header.entry_type();
        if matches!(kind, tar::EntryType::XGlobalHeader) {
            // `pax_global_header` (git archive): metadata, not a file.
            return Ok(());
        }
        let comps = safepath::clean(path);
        let Some((dir, name)) = safepath::parent_and_name(&self.root, &comps)? else {
            // `./`: the root directory's own mode.
            if kind.is_dir() {
                self.dirs.insert(self.root.clone(), meta);
            }
            return Ok(());
        };
        if name == OsStr::new(OPAQUE) {
            return clear_lower(&dir, this_layer);
        }
        if let Some(victim) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
            return remove_existing(&dir.join(OsStr::from_bytes(victim)));
        }
        let dst = dir.join(&name);
        use tar::EntryType as T;
        match kind {
            T::Directory => {
                if !fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir()) {
                    remove_existing(&dst)?;
                    fs::create_dir(&dst).map_err(write_err(&dst))?;
                }
                self.dirs.insert(dst.clone(), meta);
            }
            T::Regular | T::Continuous => {
                remove_existing(&dst)?;
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dst)
                    .map_err(write_err(&dst))?;
                io::copy(entry, &mut file).map_err(write_err(&dst))?;
                drop(file);
                self.set_meta(&dst, meta, true)?;
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(LayerError::Read)?
                    .unwrap_or_default()
                    .into_owned();
                remove_existing(&dst)?;
                std::os::unix::fs::symlink(&target, &dst).map_err(write_err(&dst))?;
                self.set_meta(&dst, meta, false)?;
            }
            T::Link => {
                let target = entry
                    .link_name()
                    .map_err(LayerError::Read)?
                    .unwrap_or_default()
                    .into_owned();
                let src =
                    safepath::resolve(&self.root, &safepath::clean(&target), false, Missing::Stop)?;
                if !fs::symlink_metadata(&src).is_ok_and(|m| !m.is_dir()) {
                    return Err(LayerError::BadHardLink { path: dst, target });
                }
                if src != dst {
                    remove_existing(&dst)?;
                    // linkat without AT_SYMLINK_FOLLOW: a symlink is linked, not followed.
                    fs::hard_link(&src, &dst).map_err(write_err(&dst))?;
                }
            }
            T::Fifo => {
                remove_existing(&dst)?;
                nix::unistd::mkfifo(&dst, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|e| write_err(&dst)(io::Error::from(e)))?;
                self.set_meta(&dst, meta, true)?;
            }
            T::Char | T::Block => {
                // The device replaces what was below, but is not made.
                remove_existing(&dst)?;
                self.notes.devices_skipped += 1;
            }
            _ => self.notes.other_skipped += 1,
        }
        this_layer.insert(dst);
        Ok(())
    }

    fn set_meta(&self, path: &Path, meta: Meta, chmod: bool) -> Result<(), LayerError> {
        if self.as_root {
            let id = |v: u64| u32::try_from(v).ok();
            std::os::unix::fs::lchown(path, id(meta.uid), id(meta.gid)).map_err(write_err(path))?;
        }
        if chmod {
            // After chown, which clears setuid.
            fs::set_permissions(path, fs::Permissions::from_mode(meta.mode))
                .map_err(write_err(path))?;
        }
        set_mtime(path, meta.mtime)
    }

    /// Sets the directories' owners, modes and mtimes, deepest first, and
    /// says what was left out.
    pub fn finish(self) -> Result<Notes, LayerError> {
        for (path, meta) in self.dirs.iter().rev() {
            let mut meta = *meta;
            if !fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            if !self.as_root {
                meta.mode |= 0o700;
            }
            self.set_meta(path, meta, true)?;
        }
        Ok(self.notes)
    }
}

/// Opens `path` for [`Flattener::apply`], reading its first bytes to tell
/// the compression.
pub fn open_sniffed(path: &Path) -> io::Result<(File, Compression)> {
    use std::io::{Seek, SeekFrom};
    let mut file = File::open(path)?;
    let mut head = [0u8; 4];
    let n = file.read(&mut head)?;
    file.seek(SeekFrom::Start(0))?;
    Ok((file, Compression::sniff(&head[..n])))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tar in memory: (path, kind, data or link target).
    pub(crate) fn tar_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            match kind {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    h.set_size(0);
                    b.append_link(&mut h, path, std::str::from_utf8(data).unwrap())
                        .unwrap();
                }
                _ => {
                    h.set_size(data.len() as u64);
                    // append_data rejects `..`; write the name raw for hostile tests.
                    let name = h.as_old_mut().name.as_mut_slice();
                    name[..path.len()].copy_from_slice(path.as_bytes());
                    h.set_cksum();
                    b.append(&h, *data).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    use tar::EntryType as T;

    fn flatten(layers: &[Vec<u8>]) -> (tempfile::TempDir, Notes) {
        let root = tempfile::tempdir().unwrap();
        let mut f = Flattener::new(root.path());
        for l in layers {
            f.apply(&l[..], Compression::None).unwrap();
        }
        let notes = f.finish().unwrap();
        (root, notes)
    }

    #[test]
    fn whiteouts_delete_from_lower_layers() {
        let base = tar_of(&[
            ("etc/", T::Directory, b""),
            ("etc/keep", T::Regular, b"keep"),
            ("etc/gone", T::Regular, b"gone"),
            ("var/", T::Directory, b""),
            ("var/cache/", T::Directory, b""),
            ("var/cache/x", T::Regular, b"x"),
        ]);
        let top = tar_of(&[
            ("etc/.wh.gone", T::Regular, b""),
            ("var/.wh.cache", T::Regular, b""),
        ]);
        let (root, _) = flatten(&[base, top]);
        let r = root.path();
        assert_eq!(fs::read(r.join("etc/keep")).unwrap(), b"keep");
        assert!(!r.join("etc/gone").exists());
        assert!(!r.join("etc/.wh.gone").exists());
        assert!(!r.join("var/cache").exists());
    }

    #[test]
    fn an_opaque_directory_hides_only_the_lower_layers() {
        let base = tar_of(&[
            ("d/", T::Directory, b""),
            ("d/old", T::Regular, b"old"),
            ("d/sub/", T::Directory, b""),
            ("d/sub/old", T::Regular, b"old"),
        ]);
        // The marker after an entry of its own layer must not delete it.
        let top = tar_of(&[
            ("d/", T::Directory, b""),
            ("d/new", T::Regular, b"new"),
            ("d/sub/", T::Directory, b""),
            ("d/.wh..wh..opq", T::Regular, b""),
            ("d/late", T::Regular, b"late"),
        ]);
        let (root, _) = flatten(&[base, top]);
        let r = root.path();
        let mut names: Vec<_> = fs::read_dir(r.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["late", "new", "sub"]);
        assert_eq!(fs::read_dir(r.join("d/sub")).unwrap().count(), 0);
    }

    #[test]
    fn links_and_replacements() {
        let base = tar_of(&[
            ("a", T::Regular, b"A"),
            ("dir/", T::Directory, b""),
            ("dir/f", T::Regular, b"f"),
        ]);
        let top = tar_of(&[
            ("hl", T::Link, b"a"),
            ("sl", T::Symlink, b"a"),
            ("dir", T::Regular, b"now a file"),
            ("dev", T::Char, b""),
            (
                "pax_global_header",
                T::XGlobalHeader,
                b"52 comment=0123456789abcdef0123456789abcdef01\n",
            ),
        ]);
        let (root, notes) = flatten(&[base, top]);
        let r = root.path();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(r.join("hl")).unwrap().ino(),
            fs::metadata(r.join("a")).unwrap().ino()
        );
        assert_eq!(fs::read_link(r.join("sl")).unwrap(), Path::new("a"));
        assert_eq!(fs::read(r.join("dir")).unwrap(), b"now a file");
        assert!(!r.join("dev").exists());
        assert!(!r.join("pax_global_header").exists());
        assert_eq!(
            notes,
            Notes {
                devices_skipped: 1,
                other_skipped: 0
            }
        );
    }

    #[test]
    fn a_hostile_layer_cannot_write_outside_the_tree() {
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"safe").unwrap();
        let o = outside.path().to_str().unwrap().to_owned();
        let layer = tar_of(&[
            ("../../../../escaped", T::Regular, b"x"),
            ("out", T::Symlink, o.as_bytes()),
            ("out/victim", T::Regular, b"owned"),
            ("rel", T::Symlink, b"../../../../../../.."),
            ("rel/tmp-escape", T::Regular, b"x"),
            ("vlink", T::Symlink, victim.to_str().unwrap().as_bytes()),
            ("vlink", T::Regular, b"through the link"),
            ("hard", T::Link, b"../../../../../etc/passwd"),
        ]);
        let root = tempfile::tempdir().unwrap();
        let mut f = Flattener::new(root.path());
        let err = f.apply(&layer[..], Compression::None).unwrap_err();
        // The hard link to a host file is refused (it is not in the tree) ...
        assert!(matches!(err, LayerError::BadHardLink { .. }), "{err}");
        // ... and nothing before it escaped.
        assert_eq!(fs::read(&victim).unwrap(), b"safe");
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1);
        let r = root.path();
        assert!(r.join("escaped").is_file());
        assert!(r.join("tmp-escape").is_file());
        let inner = r
            .join(outside.path().strip_prefix("/").unwrap())
            .join("victim");
        assert_eq!(fs::read(inner).unwrap(), b"owned");
        assert_eq!(fs::read(r.join("vlink")).unwrap(), b"through the link");
        assert!(!fs::symlink_metadata(r.join("vlink"))
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn gzip_and_zstd_layers() {
        use std::io::Write;
        let plain = tar_of(&[("f", T::Regular, b"data")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(Compression::sniff(&gz), Compression::Gzip);
        assert_eq!(Compression::sniff(&plain), Compression::None);
        let root = tempfile::tempdir().unwrap();
        let mut f = Flattener::new(root.path());
        f.apply(&gz[..], Compression::Gzip).unwrap();
        assert_eq!(fs::read(root.path().join("f")).unwrap(), b"data");
        let zst = ruzstd::encoding::compress_to_vec(
            &plain[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert_eq!(Compression::sniff(&zst), Compression::Zstd);
        let root = tempfile::tempdir().unwrap();
        let mut f = Flattener::new(root.path());
        f.apply(&zst[..], Compression::Zstd).unwrap();
        assert_eq!(fs::read(root.path().join("f")).unwrap(), b"data");
        assert!(f.apply(&b"not zstd"[..], Compression::Zstd).is_err());
    }
}
